"""The mediator identity: created once, shared safely, usable under any of its DIDs."""

from __future__ import annotations

import json
import stat
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from dovecote.didcomm.identity import load_or_create
from dovecote.didcomm.packing import Packer


def _load(path: str) -> str:
    return load_or_create(Path(path), ["http://a.example", "ws://a.example/ws"]).did


def test_created_once_with_private_mode_and_reused(tmp_path: Path) -> None:
    first = load_or_create(tmp_path, ["http://a.example"])
    path = tmp_path / "identity.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create(tmp_path, ["http://a.example"])
    assert again.did == first.did
    assert again.agreement_key.get_secret_bytes() == first.agreement_key.get_secret_bytes()


def test_concurrent_first_start_agrees_on_one_key(tmp_path: Path) -> None:
    path = str(tmp_path / "shared" / "identity.json")
    with ProcessPoolExecutor(4) as pool:
        dids = set(pool.map(_load, [path] * 8))
    assert len(dids) == 1


async def test_any_did_with_our_keys_decrypts(tmp_path: Path) -> None:
    old = load_or_create(tmp_path, ["http://old.example"])
    new = load_or_create(tmp_path, ["http://new.example"])
    assert new.did != old.did
    assert json.loads((tmp_path / "identity.json").read_text())["dids"][1] == old.did
    packer = Packer(new)
    await packer.start()
    sender = Packer(load_or_create(tmp_path / "sender", ["http://s.example"]))
    await sender.start()
    # Someone still holding the old DID encrypts to it: we decrypt.
    packed = await sender.pack_for({"id": "1", "type": "t", "body": {}}, old.did)
    unpacked = await packer.unpack(packed)
    assert unpacked.sender == sender.identity.did
