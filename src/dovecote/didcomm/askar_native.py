"""The askar calls that open and seal envelopes, made on askar's C functions directly.

Why hand-written: aries_askar's Python wrappers route every call through a generic path
(`Lib.invoke`: the method looked up by name, each argument converted by its `from_param`,
a `ByteBuffer`/`FfiByteBuffer` object per buffer) and attach a `weakref.finalize` to every
key handle and returned buffer. For one anoncrypt open (four askar calls, three temporary
keys, one buffer) that cost about twice askar's native work (bench/jwe_open.py,
docs/performance.md). No library offers a cheaper binding to askar: aries_askar is the
only one, and didcomm-messaging calls through it with more layers on top. So the four C
functions an open needs (`askar_key_from_jwk`, `askar_key_derive_ecdh_es` or
`askar_key_derive_ecdh_1pu`, `askar_key_unwrap_key`, `askar_key_aead_decrypt`) and the
two that free what they return get ctypes prototypes once, on the library aries_askar has
already loaded (its `LibLoad._cdll`: the same library instance and error state), and the
temporary handles and the plaintext buffer are freed in `finally` rather than by GC.
The sender's side of authcrypt (every reply and live push) is made the same way:
`askar_key_generate` (the CEK and the ephemeral key), `askar_key_get_jwk_public`,
`askar_key_aead_encrypt`, `askar_key_derive_ecdh_1pu` with `receive` 0 and
`askar_key_wrap_key`; one authcrypt took 415 µs through the wrappers and 260 µs here
(bench/crypto_floor.py, docs/performance.md).

What this costs to keep: the prototypes below are askar's C ABI (src/ffi/key.rs and
src/ffi/secret.rs), identical from askar 0.3.0 to 0.5.0 but for `askar_key_generate`,
which gained a `key_backend` argument in 0.3.2 (both shapes are declared, by version;
the sender's functions were compared with src/ffi/key.rs of each release from 0.3.0 to
0.5.0 and with the bindings aries_askar declares for them). At import the installed
native library's version (`askar_version`) is checked against that range; outside it, or
if aries_askar no longer exposes its library handle, the wrappers are used (`Wrapped`,
the calls jwe.py made before) and a warning says why. A new askar release needs its
src/ffi/key.rs compared with the prototypes here before its version is added to
`ABI_VERSIONS`.

Both classes raise aries_askar's AskarError (the same message and code: on failure the
native path asks askar for its current error as the wrappers do) for jwe.py to map.
Handles are passed as `c_size_t`: askar's `LocalKeyHandle` is a `#[repr(C)]` struct of
one pointer, passed as that pointer, and aries_askar's own destructors pass it so.
"""

from __future__ import annotations

import ctypes
import re
from ctypes import POINTER, byref, c_char_p, c_int8, c_int64, c_size_t, c_void_p
from typing import Any

import structlog
from aries_askar import AskarError, Key, KeyAlg, ecdh
from aries_askar.bindings import Encrypted

from dovecote.util.jsonlimits import dumps_compact

log = structlog.get_logger("dovecote.askar")

# askar releases whose C ABI for the functions below was compared with these prototypes.
ABI_VERSIONS = ("0.3.", "0.4.", "0.5.")

# What jwe.py holds between calls: a native key handle (int) or, with `Wrapped`, a Key.
Handle = Any


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch) of an askar version such as "0.3.2" or "0.3.0-dev.1"."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("-")[0])[:3])


class _Bytes(ctypes.Structure):
    """askar's `ByteBuffer` argument (ffi_support): borrowed bytes, by value."""

    _fields_ = [("len", c_int64), ("data", c_char_p)]


class _Secret(ctypes.Structure):
    """askar's `SecretBuffer` result: bytes askar allocated, freed by askar_buffer_free."""

    _fields_ = [("len", c_int64), ("data", c_void_p)]


_EMPTY = _Bytes(0, None)  # an absent buffer (the wrappers pass None as this)


class Wrapped:
    """The same calls on aries_askar's Python wrappers (the fallback)."""

    def epk(self, jwk: dict[str, Any]) -> Handle:
        return Key.from_jwk(jwk)

    def free(self, handle: Handle) -> None:
        pass  # the wrappers' finalizer frees it

    def unwrap_es(
        self,
        alg: str,
        wrap: str,
        enc: str,
        epk: Handle,
        secret: Key,
        apv: bytes,
        encrypted_key: bytes,
    ) -> Handle:
        return ecdh.EcdhEs(alg, None, apv).receiver_unwrap_key(
            wrap, enc, epk, secret, encrypted_key
        )

    def unwrap_1pu(
        self,
        alg: str,
        wrap: str,
        enc: str,
        epk: Handle,
        sender: Key,
        secret: Key,
        apu: bytes,
        apv: bytes,
        cc_tag: bytes,
        encrypted_key: bytes,
    ) -> Handle:
        return ecdh.Ecdh1PU(alg, apu, apv).receiver_unwrap_key(
            wrap, enc, epk, sender, secret, encrypted_key, cc_tag=cc_tag
        )

    def decrypt(self, cek: Handle, ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes) -> bytes:
        return bytes(cek.aead_decrypt(ciphertext, nonce=iv, tag=tag, aad=aad))

    def generate(self, alg: KeyAlg, ephemeral: bool) -> Handle:
        return Key.generate(alg, ephemeral=ephemeral)

    def jwk_public(self, key: Handle) -> bytes:
        return str(key.get_jwk_public()).encode()

    def encrypt(self, cek: Handle, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        return _parts(cek.aead_encrypt(plaintext, aad=aad))

    def wrap_1pu(
        self,
        alg: str,
        wrap: str,
        epk: Handle,
        sender: Key,
        recipient: Key,
        apu: bytes,
        apv: bytes,
        cc_tag: bytes,
        cek: Handle,
    ) -> bytes:
        wrapped = ecdh.Ecdh1PU(alg, apu, apv).sender_wrap_key(
            wrap, epk, sender, recipient, cek, cc_tag=cc_tag
        )
        return _parts(wrapped)[0]


def _parts(encrypted: Encrypted) -> tuple[bytes, bytes, bytes]:
    """(ciphertext, tag, nonce) of an askar AEAD result, copied out in one piece: its own
    accessors slice the ctypes array into a list of ints (~4 ms for 150 kB)."""
    whole = bytes(encrypted.buffer)
    tag_pos, nonce_pos = encrypted.tag_pos, encrypted.nonce_pos
    return whole[:tag_pos], whole[tag_pos:nonce_pos], whole[nonce_pos:]


class _Encrypted(ctypes.Structure):
    """askar's `EncryptedBuffer` result: one `SecretBuffer` of ciphertext || tag || nonce
    and where the tag and the nonce start."""

    _fields_ = [("buffer", _Secret), ("tag_pos", c_int64), ("nonce_pos", c_int64)]


class Native(Wrapped):
    """The calls on askar's C functions (module docstring)."""

    def __init__(self, loaded: Any, version: str) -> None:
        cdll = loaded._cdll
        self._error = loaded.get_current_error

        def prototype(name: str, restype: Any, *argtypes: Any) -> Any:
            # A function object of our own (CDLL[name], not CDLL.name): the wrappers set
            # their own argtypes on the attribute they cache.
            function = cdll[name]
            function.argtypes = argtypes
            function.restype = restype
            return function

        handle_out = POINTER(c_size_t)
        self._from_jwk = prototype("askar_key_from_jwk", c_int64, _Bytes, handle_out)
        self._derive_es = prototype(
            "askar_key_derive_ecdh_es",
            c_int64,
            c_char_p,  # alg (FfiStr)
            c_size_t,  # ephemeral key
            c_size_t,  # recipient key
            _Bytes,  # alg_id
            _Bytes,  # apu
            _Bytes,  # apv
            c_int8,  # receive
            handle_out,
        )
        self._derive_1pu = prototype(
            "askar_key_derive_ecdh_1pu",
            c_int64,
            c_char_p,  # alg
            c_size_t,  # ephemeral key
            c_size_t,  # sender key
            c_size_t,  # recipient key
            _Bytes,  # alg_id
            _Bytes,  # apu
            _Bytes,  # apv
            _Bytes,  # cc_tag
            c_int8,  # receive
            handle_out,
        )
        self._unwrap = prototype(
            "askar_key_unwrap_key",
            c_int64,
            c_size_t,  # wrapping key
            c_char_p,  # alg of the unwrapped key
            _Bytes,  # ciphertext
            _Bytes,  # nonce
            _Bytes,  # tag
            handle_out,
        )
        self._aead_decrypt = prototype(
            "askar_key_aead_decrypt",
            c_int64,
            c_size_t,
            _Bytes,  # ciphertext
            _Bytes,  # nonce
            _Bytes,  # tag
            _Bytes,  # aad
            POINTER(_Secret),
        )
        self._key_free = prototype("askar_key_free", None, c_size_t)
        self._buffer_free = prototype("askar_buffer_free", None, _Secret)
        # The sender's side (authcrypt of replies and live pushes).
        # 0.3.2 added the key's backend (NULL: software) before `ephemeral`; the old call
        # on the new function would make askar write the handle to a stray address.
        self._with_backend = _release(version) >= (0, 3, 2)
        generate_args = (c_char_p, c_char_p) if self._with_backend else (c_char_p,)
        self._generate = prototype(
            "askar_key_generate", c_int64, *generate_args, c_int8, handle_out
        )
        self._jwk_public = prototype(
            "askar_key_get_jwk_public", c_int64, c_size_t, c_char_p, POINTER(c_void_p)
        )
        self._string_free = prototype("askar_string_free", None, c_void_p)
        self._aead_encrypt = prototype(
            "askar_key_aead_encrypt",
            c_int64,
            c_size_t,
            _Bytes,  # plaintext
            _Bytes,  # nonce (empty: askar draws one)
            _Bytes,  # aad
            POINTER(_Encrypted),
        )
        self._wrap = prototype(
            "askar_key_wrap_key",
            c_int64,
            c_size_t,  # wrapping key
            c_size_t,  # key to wrap
            _Bytes,  # nonce
            POINTER(_Encrypted),
        )

    def _failed(self) -> AskarError:
        error: AskarError = self._error(True)
        return error

    def epk(self, jwk: dict[str, Any]) -> Handle:
        # 0.3 against 2.1 µs; askar parses the text, so the same bytes are not needed,
        # but the same meaning is: json.dumps, as the wrappers, unless all are strings
        # (orjson writes NaN as null, which askar would then ignore instead of refusing).
        data = dumps_compact(jwk)
        out = c_size_t()
        if self._from_jwk(_Bytes(len(data), data), byref(out)):
            raise self._failed()
        return out.value

    def free(self, handle: Handle) -> None:
        if handle:
            self._key_free(handle)

    def _unwrap_with(self, kek: c_size_t, enc: str, encrypted_key: bytes) -> Handle:
        try:
            cek = c_size_t()
            if self._unwrap(
                kek, enc.encode(), _Bytes(len(encrypted_key), encrypted_key), _EMPTY, _EMPTY,
                byref(cek),
            ):  # fmt: skip
                raise self._failed()
            return cek.value
        finally:
            self._key_free(kek)

    def unwrap_es(
        self,
        alg: str,
        wrap: str,
        enc: str,
        epk: Handle,
        secret: Key,
        apv: bytes,
        encrypted_key: bytes,
    ) -> Handle:
        alg_id = alg.encode()
        kek = c_size_t()
        if self._derive_es(
            wrap.encode(), epk, secret.handle.value, _Bytes(len(alg_id), alg_id), _EMPTY,
            _Bytes(len(apv), apv), 1, byref(kek),
        ):  # fmt: skip
            raise self._failed()
        return self._unwrap_with(kek, enc, encrypted_key)

    def unwrap_1pu(
        self,
        alg: str,
        wrap: str,
        enc: str,
        epk: Handle,
        sender: Key,
        secret: Key,
        apu: bytes,
        apv: bytes,
        cc_tag: bytes,
        encrypted_key: bytes,
    ) -> Handle:
        kek = self._kek_1pu(alg, wrap, epk, sender, secret, apu, apv, cc_tag, receive=True)
        return self._unwrap_with(kek, enc, encrypted_key)

    def _kek_1pu(
        self,
        alg: str,
        wrap: str,
        epk: Handle,
        sender: Key,
        recipient: Key,
        apu: bytes,
        apv: bytes,
        cc_tag: bytes,
        receive: bool,
    ) -> c_size_t:
        """The ECDH-1PU key-wrapping key (the caller frees it), on either side."""
        alg_id = alg.encode()
        kek = c_size_t()
        if self._derive_1pu(
            wrap.encode(), epk, sender.handle.value, recipient.handle.value,
            _Bytes(len(alg_id), alg_id), _Bytes(len(apu), apu), _Bytes(len(apv), apv),
            _Bytes(len(cc_tag), cc_tag), int(receive), byref(kek),
        ):  # fmt: skip
            raise self._failed()
        return kek

    def decrypt(self, cek: Handle, ciphertext: bytes, iv: bytes, tag: bytes, aad: bytes) -> bytes:
        out = _Secret()
        try:
            if self._aead_decrypt(
                cek, _Bytes(len(ciphertext), ciphertext), _Bytes(len(iv), iv),
                _Bytes(len(tag), tag), _Bytes(len(aad), aad), byref(out),
            ):  # fmt: skip
                raise self._failed()
            return ctypes.string_at(out.data, out.len) if out.len else b""
        finally:
            if out.data:
                self._buffer_free(out)

    def generate(self, alg: KeyAlg, ephemeral: bool) -> Handle:
        out = c_size_t()
        backend = (None,) if self._with_backend else ()
        if self._generate(alg.value.encode(), *backend, int(ephemeral), byref(out)):
            raise self._failed()
        return out.value

    def jwk_public(self, key: Handle) -> bytes:
        out = c_void_p()
        if self._jwk_public(key, None, byref(out)):
            raise self._failed()
        try:
            return ctypes.string_at(out)
        finally:
            self._string_free(out)

    def _sealed(self, result: _Encrypted) -> tuple[bytes, bytes, bytes]:
        # _parts, on the struct askar filled in; the buffer is freed here, not by GC.
        try:
            whole = ctypes.string_at(result.buffer.data, result.buffer.len)
            tag_pos, nonce_pos = result.tag_pos, result.nonce_pos
            return whole[:tag_pos], whole[tag_pos:nonce_pos], whole[nonce_pos:]
        finally:
            if result.buffer.data:
                self._buffer_free(result.buffer)

    def encrypt(self, cek: Handle, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
        out = _Encrypted()
        if self._aead_encrypt(
            cek, _Bytes(len(plaintext), plaintext), _EMPTY, _Bytes(len(aad), aad), byref(out)
        ):
            raise self._failed()
        return self._sealed(out)

    def wrap_1pu(
        self,
        alg: str,
        wrap: str,
        epk: Handle,
        sender: Key,
        recipient: Key,
        apu: bytes,
        apv: bytes,
        cc_tag: bytes,
        cek: Handle,
    ) -> bytes:
        kek = self._kek_1pu(alg, wrap, epk, sender, recipient, apu, apv, cc_tag, receive=False)
        try:
            out = _Encrypted()
            if self._wrap(kek, cek, _EMPTY, byref(out)):
                raise self._failed()
            return self._sealed(out)[0]
        finally:
            self._key_free(kek)


def _choose() -> Wrapped:
    from aries_askar import bindings

    try:
        library = bindings.get_library()
        version = library.version()
        if not version.startswith(ABI_VERSIONS):
            reason = f"askar {version} is not one of the ABIs checked ({', '.join(ABI_VERSIONS)}x)"
        elif not hasattr(library.loaded, "_cdll"):
            reason = "aries_askar no longer exposes its loaded library (LibLoad._cdll)"
        else:
            return Native(library.loaded, version)
    except (AttributeError, AskarError, OSError) as exc:  # a function missing, or no library
        reason = f"askar's C functions are not usable: {exc}"
    log.warning("askar_wrappers_used", reason=reason)
    return Wrapped()


CRYPTO: Wrapped = _choose()
