"""askar_native.Native, the sender's side: every key, buffer and string askar hands out
during an authcrypt is freed exactly once, whether the pack succeeds or fails at any of
its C calls; each envelope draws its own IV and ephemeral key; and the shape of
`askar_key_generate` follows the installed askar's version."""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Callable
from ctypes import c_size_t
from typing import Any

import pytest
from aries_askar import AskarError, Key, KeyAlg
from aries_askar.bindings import get_library

from dovecote.didcomm import askar_native, jwe


def _native() -> askar_native.Native:
    library = get_library()
    return askar_native.Native(library.loaded, library.version())


class Ledger:
    """What a Native was handed by askar and what it gave back, with a failure on call N."""

    def __init__(self, native: askar_native.Native) -> None:
        self.keys: set[int] = set()
        self.buffers = 0
        self.strings = 0
        self.calls: list[str] = []
        self.fail_at: int | None = None
        self.unknown_frees: list[int] = []
        for name, kind in [
            ("_generate", "key"),
            ("_derive_1pu", "key"),
            ("_jwk_public", "string"),
            ("_aead_encrypt", "buffer"),
            ("_wrap", "buffer"),
        ]:
            setattr(native, name, self._made(name, kind, getattr(native, name)))
        key_free, buffer_free, string_free = (
            native._key_free,
            native._buffer_free,
            native._string_free,
        )

        def free_key(handle: Any) -> None:
            value = handle.value if isinstance(handle, c_size_t) else handle
            if value not in self.keys:
                self.unknown_frees.append(value)
                return
            self.keys.discard(value)
            key_free(handle)

        def free_buffer(buffer: Any) -> None:
            self.buffers -= 1
            buffer_free(buffer)

        def free_string(text: Any) -> None:
            self.strings -= 1
            string_free(text)

        native._key_free = free_key
        native._buffer_free = free_buffer
        native._string_free = free_string

    def _made(self, name: str, kind: str, call: Callable[..., int]) -> Callable[..., int]:
        def counted(*args: Any) -> int:
            self.calls.append(name)
            if self.fail_at == len(self.calls):
                return 1  # askar's error code for "input": the wrappers raise on any non-zero
            code = call(*args)
            if code == 0:
                if kind == "key":
                    self.keys.add(args[-1]._obj.value)
                elif kind == "string":
                    self.strings += 1
                else:
                    self.buffers += 1
            return code

        return counted

    def balanced(self) -> bool:
        return not self.keys and not self.buffers and not self.strings and not self.unknown_frees


def _pack(native: askar_native.Native, recipients: int = 3) -> bytes:
    sender = Key.generate(KeyAlg.X25519)
    to = [(f"did:example:r{i}#key-2", Key.generate(KeyAlg.X25519)) for i in range(recipients)]
    previous = jwe._crypto
    jwe._crypto = native
    try:
        return jwe.authcrypt(b"x" * 300, to, "did:example:s#key-2", sender, KeyAlg.X25519)
    finally:
        jwe._crypto = previous


def test_every_handle_and_buffer_is_freed_once_on_success_and_on_each_failure() -> None:
    native = _native()
    ledger = Ledger(native)
    _pack(native)
    steps = Counter(ledger.calls)
    # Two keys made, a JWK, one encryption, then a derive and a wrap per recipient.
    assert steps == {"_generate": 2, "_jwk_public": 1, "_aead_encrypt": 1} | {
        "_derive_1pu": 3,
        "_wrap": 3,
    }
    assert ledger.balanced()
    for step in range(1, len(ledger.calls) + 1):
        ledger.calls, ledger.fail_at = [], step
        with pytest.raises(AskarError):
            _pack(native)
        assert ledger.balanced(), (step, ledger.keys, ledger.buffers, ledger.strings)


def test_each_envelope_draws_its_own_iv_and_ephemeral_key() -> None:
    native = _native()
    envelopes = [json.loads(_pack(native, recipients=1)) for _ in range(20)]
    ivs = [base64.urlsafe_b64decode(e["iv"] + "==") for e in envelopes]
    assert {len(iv) for iv in ivs} == {16}  # A256CBC-HS512
    assert len(set(ivs)) == len(ivs)
    headers = [json.loads(base64.urlsafe_b64decode(e["protected"] + "==")) for e in envelopes]
    assert len({h["epk"]["x"] for h in headers}) == len(headers)


@pytest.mark.parametrize(
    ("version", "with_backend"),
    [
        ("0.3.0", False),
        ("0.3.1", False),
        ("0.3.0-dev.1", False),
        ("0.3.2", True),
        ("0.3.3", True),
        ("0.4.0", True),
        ("0.5.0", True),
    ],
)
def test_key_generate_takes_a_backend_from_askar_0_3_2(version: str, with_backend: bool) -> None:
    """askar 0.3.2 added `key_backend` before `ephemeral` (its src/ffi/key.rs and
    aries_askar's bindings of that release): the three-argument call on a four-argument
    function would write the new key's handle to a stray address."""
    native = askar_native.Native(get_library().loaded, version)
    assert native._with_backend is with_backend
