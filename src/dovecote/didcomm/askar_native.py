"""The askar calls of an envelope open, made on askar's C functions directly.

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

What this costs to keep: the prototypes below are askar's C ABI (src/ffi/key.rs and
src/ffi/secret.rs), identical from askar 0.3.0 to 0.5.0. At import the installed native
library's version (`askar_version`) is checked against that range; outside it, or if
aries_askar no longer exposes its library handle, the wrappers are used (`Wrapped`, the
calls jwe.py made before) and a warning says why. A new askar release needs its
src/ffi/key.rs compared with the prototypes here before its version is added to
`ABI_VERSIONS`.

Both classes raise aries_askar's AskarError (the same message and code: on failure the
native path asks askar for its current error as the wrappers do) for jwe.py to map.
Handles are passed as `c_size_t`: askar's `LocalKeyHandle` is a `#[repr(C)]` struct of
one pointer, passed as that pointer, and aries_askar's own destructors pass it so.
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, byref, c_char_p, c_int8, c_int64, c_size_t, c_void_p
from typing import Any

import structlog
from aries_askar import AskarError, Key, ecdh

from dovecote.util.jsonlimits import dumps_compact

log = structlog.get_logger("dovecote.askar")

# askar releases whose C ABI for the functions below was compared with these prototypes.
ABI_VERSIONS = ("0.3.", "0.4.", "0.5.")

# What jwe.py holds between calls: a native key handle (int) or, with `Wrapped`, a Key.
Handle = Any


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


class Native(Wrapped):
    """The calls on askar's C functions (module docstring)."""

    def __init__(self, loaded: Any) -> None:
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
        alg_id = alg.encode()
        kek = c_size_t()
        if self._derive_1pu(
            wrap.encode(), epk, sender.handle.value, secret.handle.value,
            _Bytes(len(alg_id), alg_id), _Bytes(len(apu), apu), _Bytes(len(apv), apv),
            _Bytes(len(cc_tag), cc_tag), 1, byref(kek),
        ):  # fmt: skip
            raise self._failed()
        return self._unwrap_with(kek, enc, encrypted_key)

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
            return Native(library.loaded)
    except (AttributeError, AskarError, OSError) as exc:  # a function missing, or no library
        reason = f"askar's C functions are not usable: {exc}"
    log.warning("askar_wrappers_used", reason=reason)
    return Wrapped()


CRYPTO: Wrapped = _choose()
