"""Red team: rooms tokens that are not JSON-shaped the way the checks assumed.

The token header is read before any signature check, so anyone can send one whose header
is thousands of nested arrays: the rooms API answered 500 and the rooms WebSocket closed
with 1011 (RecursionError). A token signed by the issuer with an `exp` past float range
(joserfc accepts any number) did the same. Each is now a 401 / 4001 with the usual body.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from joserfc.jwk import OKPKey
from joserfc.jws import serialize_compact
from websockets.exceptions import ConnectionClosed

from support.rooms import ws_connect, ws_recv
from support.server import ServerProcess, running_server


@pytest.fixture(scope="module")
def rooms_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("redteam-rooms")) as server:
        yield server


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _signed(server: ServerProcess, claims: bytes) -> str:
    """Claims bytes signed with the development issuer's key (as `dovecote rooms token`)."""
    key = OKPKey.import_key(json.loads(Path(server.data_dir / "rooms-dev-key.json").read_text()))
    return serialize_compact({"alg": "EdDSA", "kid": key.kid}, claims, key, algorithms=["EdDSA"])


def _tokens(server: ServerProcess) -> dict[str, str]:
    return {
        "deep-header": f"{_b64(b'[' * 5000)}.{_b64(b'{}')}.{_b64(b'sig')}",
        "huge-exp": _signed(server, b'{"sub":"alice","rooms":"*","exp":1' + b"0" * 400 + b"}"),
    }


@pytest.mark.parametrize("name", ["deep-header", "huge-exp"])
def test_hostile_token_is_401_on_the_rooms_api(rooms_server: ServerProcess, name: str) -> None:
    token = _tokens(rooms_server)[name]
    for method in ("GET", "POST"):
        answer = httpx.request(
            method,
            rooms_server.base_url + "/v1/rooms",
            json={"id": "r"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert answer.status_code == 401, (name, answer.status_code, answer.text[:200])
        assert answer.json()["error"] == "e.m.trust.token"


@pytest.mark.parametrize("name", ["deep-header", "huge-exp"])
async def test_hostile_token_is_refused_on_the_rooms_socket(
    rooms_server: ServerProcess, name: str
) -> None:
    token = _tokens(rooms_server)[name]
    ws = await ws_connect(rooms_server.base_url)
    try:
        await ws.send(json.dumps({"action": "auth", "token": token}))
        frame = await ws_recv(ws)
        assert frame["type"] == "error" and frame["error"] == "e.m.trust.token", frame
        with pytest.raises(ConnectionClosed) as closed:
            await ws_recv(ws)
    finally:
        await ws.close()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4001, (name, closed.value.rcvd)
