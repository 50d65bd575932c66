"""CPU per envelope open (dovecote.didcomm.jwe.open_envelope), in-process, interleaved.

    PYTHONPATH=$PWD/src python -m bench.jwe_open [--count 2000] [--rounds 12]

Real anoncrypt forwards (bench/agents.py's make_forward, for a fresh mediator identity)
are parsed once; then each variant opens all of them per round, variants alternating
round by round so that other work on the machine hits each alike. Thread CPU time per
open; the median and the best round are printed with the load average.

Variants: `wrappers` (the envelope open on aries_askar's Python wrappers), `native` (on
askar's C functions through jwe.py's own ctypes prototypes), and `floor`: only the four
askar calls of an open and the frees, with every argument built before the clock starts,
i.e. askar's native work plus the least ctypes can cost.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import json
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aries_askar import Key, KeyAlg

from bench.agents import BenchAgent, make_forward
from dovecote.didcomm import jwe
from dovecote.didcomm.identity import Identity, make_did
from dovecote.didcomm.packing import Packer

Parsed = tuple[dict[str, Any], dict[str, Any]]


def _run(coro: Coroutine[Any, Any, jwe.Opened]) -> jwe.Opened:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    raise RuntimeError("the open suspended")


async def _forwards(count: int) -> tuple[Packer, list[Parsed]]:
    signing, agreement = Key.generate(KeyAlg.ED25519), Key.generate(KeyAlg.X25519)
    identity = Identity(signing, agreement, [make_did(signing, agreement, [])])
    recipient = await BenchAgent.create()
    parsed = []
    for i in range(count):
        envelope = json.loads(await make_forward(recipient.did, identity.did, i))
        protected = envelope["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        parsed.append((envelope, header))
    return Packer(identity), parsed


async def _no_sender(kid: str) -> Key:
    raise RuntimeError("anoncrypt only")


def _open_with(crypto: Any, packer: Packer) -> Callable[[Parsed], bytes]:
    def open_one(item: Parsed) -> bytes:
        if crypto is None:  # jwe.py as it is (also before askar_native existed)
            return _run(jwe.open_envelope(*item, packer.secret_for, _no_sender)).plaintext
        saved = jwe._crypto
        jwe._crypto = crypto
        try:
            return _run(jwe.open_envelope(*item, packer.secret_for, _no_sender)).plaintext
        finally:
            jwe._crypto = saved

    return open_one


class _Buf(ctypes.Structure):
    _fields_ = [("len", ctypes.c_int64), ("data", ctypes.c_char_p)]


class _Out(ctypes.Structure):
    _fields_ = [("len", ctypes.c_int64), ("data", ctypes.c_void_p)]


def _floor(packer: Packer, parsed: list[Parsed]) -> tuple[Callable[[Any], bytes], list[Any]]:
    """The askar calls alone, arguments prepared per envelope in advance."""
    from aries_askar.bindings import get_library

    cdll = get_library().loaded._cdll
    h, buf, out = ctypes.c_size_t, _Buf, _Out
    p = ctypes.POINTER
    fns = {}
    for name, args in {
        "askar_key_from_jwk": (buf, p(h)),
        "askar_key_derive_ecdh_es": (ctypes.c_char_p, h, h, buf, buf, buf, ctypes.c_int8, p(h)),
        "askar_key_unwrap_key": (h, ctypes.c_char_p, buf, buf, buf, p(h)),
        "askar_key_aead_decrypt": (h, buf, buf, buf, buf, p(out)),
        "askar_key_free": (h,),
        "askar_buffer_free": (out,),
    }.items():
        fn = cdll[name]
        fn.argtypes = args
        fn.restype = None if name.endswith("free") else ctypes.c_int64
        fns[name] = fn
    from_jwk, derive, unwrap, decrypt = (
        fns["askar_key_from_jwk"],
        fns["askar_key_derive_ecdh_es"],
        fns["askar_key_unwrap_key"],
        fns["askar_key_aead_decrypt"],
    )
    key_free, buffer_free = fns["askar_key_free"], fns["askar_buffer_free"]
    byref, empty = ctypes.byref, buf(0, None)

    def b(data: bytes) -> _Buf:
        return buf(len(data), data)

    prepared = []
    for envelope, header in parsed:
        kid = envelope["recipients"][0]["header"]["kid"]
        secret = packer.secret_for(kid)
        assert secret is not None
        epk = json.dumps(envelope["recipients"][0]["header"]["epk"]).encode()
        prepared.append(
            (
                b(epk),
                secret._handle.value,
                b(header["alg"].encode()),
                b(jwe.b64url_decode(header["apv"])),
                header["enc"].encode(),
                b(jwe.b64url_decode(envelope["recipients"][0]["encrypted_key"])),
                b(jwe.b64url_decode(envelope["ciphertext"])),
                b(jwe.b64url_decode(envelope["iv"])),
                b(jwe.b64url_decode(envelope["tag"])),
                b(envelope["protected"].encode()),
            )
        )

    def open_one(item: Any) -> bytes:
        epk_json, secret, alg, apv, enc, wrapped, ciphertext, iv, tag, aad = item
        epk, kek, cek, plain = h(), h(), h(), out()
        try:
            if from_jwk(epk_json, byref(epk)):
                raise RuntimeError("from_jwk")
            if derive(b"A256KW", epk, secret, alg, empty, apv, 1, byref(kek)):
                raise RuntimeError("derive")
            if unwrap(kek, enc, wrapped, empty, empty, byref(cek)):
                raise RuntimeError("unwrap")
            if decrypt(cek, ciphertext, iv, tag, aad, byref(plain)):
                raise RuntimeError("decrypt")
            return ctypes.string_at(plain.data, plain.len)
        finally:
            for handle in (epk, kek, cek):
                if handle.value:
                    key_free(handle)
            if plain.data:
                buffer_free(plain)

    return open_one, prepared


def _crypto(name: str) -> Any:
    if name == "current":
        return None
    from aries_askar.bindings import get_library

    from dovecote.didcomm import askar_native

    if name == "wrappers":
        return askar_native.Wrapped()
    assert name == "native", name
    return askar_native.Native(get_library().loaded, get_library().version())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--variants", default="wrappers,native,floor")
    args = parser.parse_args()
    packer, parsed = asyncio.run(_forwards(args.count))
    variants: dict[str, tuple[Callable[[Any], bytes], list[Any]]] = {}
    for name in args.variants.split(","):
        if name == "floor":
            variants[name] = _floor(packer, parsed)
        else:
            variants[name] = (_open_with(_crypto(name), packer), parsed)
    expected = [_open_with(None, packer)(item) for item in parsed]
    for name, (fn, items) in variants.items():
        assert [fn(item) for item in items] == expected, name
    print(f"{args.count} forwards, {len(parsed[0][0]['ciphertext'])} chars of ciphertext each")
    print(f"load before: {open('/proc/loadavg').read().strip()}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, items = variants[name]
            start = time.thread_time()
            for item in items:
                fn(item)
            times[name].append((time.thread_time() - start) / len(items) * 1e6)
    print(f"load after: {open('/proc/loadavg').read().strip()} (pid {os.getpid()})")
    for name, values in times.items():
        print(
            f"{name:>9}: median {statistics.median(values):6.1f} µs, best {min(values):6.1f}"
            f" µs per open ({args.rounds} rounds of {len(parsed)})"
        )


if __name__ == "__main__":
    main()
