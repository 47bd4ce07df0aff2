"""Payload codecs: what the store holds instead of the values in a run's log.

A codec turns bytes into bytes and back. Applied to a store
(``Conductor(backend, codec=Encrypt(key))``), it encodes every value a run
carries (arguments, step results, events, published and emitted values,
the result) before they reach the store, so a store holds no plaintext of
them; record kinds, names, times and error messages stay readable. What it
writes is data (a JSON object naming the codec), never code.

* :class:`Encrypt`: AES-256-GCM from the ``cryptography`` package (``pip
  install 'substantial[crypto]'``), keys rotated with ``old_keys``.
* :class:`Compress`: zlib.
* :class:`Chain`: several in turn, e.g. ``Chain(Compress(), Encrypt(key))``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import zlib
from typing import Any, Protocol

import orjson

from substantial.errors import BackendError, InvalidArgument

__all__ = ["Chain", "Codec", "CodecError", "Compress", "Encrypt", "seal", "unseal"]

#: The key of the JSON object a sealed value becomes: ``{"$codec": name, "b": base64}``.
MARK = "$codec"


class CodecError(BackendError):
    """A value in the store cannot be decoded: another codec, a missing key, or tampering."""


class Codec(Protocol):
    """Turns bytes into bytes and back; ``name`` is recorded beside what it wrote."""

    name: str

    def encode(self, data: bytes) -> bytes:
        """Return what the store keeps for ``data``."""

    def decode(self, data: bytes) -> bytes:
        """Return the bytes :meth:`encode` was given; raise :class:`CodecError` if it cannot."""


class Compress:
    """zlib compression: worth it for large values, not for small ones."""

    name = "zlib"

    def __init__(self, level: int = 6) -> None:
        self.level = level

    def encode(self, data: bytes) -> bytes:
        """Compress ``data``."""
        return zlib.compress(data, self.level)

    def decode(self, data: bytes) -> bytes:
        """Decompress ``data``."""
        try:
            return zlib.decompress(data)
        except zlib.error as exc:
            raise CodecError(f"a value does not decompress: {exc}") from exc


def _key_bytes(key: bytes | str) -> bytes:
    if isinstance(key, bytes):
        raw = key
    else:
        try:
            raw = base64.urlsafe_b64decode(key.encode())
        except (binascii.Error, ValueError) as exc:
            raise InvalidArgument(f"an Encrypt key given as text must be base64: {exc}") from exc
    if len(raw) != 32:
        raise InvalidArgument(
            f"an Encrypt key is 32 bytes (AES-256), got {len(raw)}: "
            "make one with substantial.codecs.Encrypt.generate_key()"
        )
    return raw


class Encrypt:
    """AES-256-GCM with a key you hold; ``old_keys`` still decrypt what they encrypted.

    Each value gets a fresh 96-bit nonce and is stored as the key's 8-byte id,
    the nonce and the ciphertext with its tag, so a changed byte or a wrong
    key is detected, never decoded into garbage.
    """

    name = "aesgcm"

    def __init__(self, key: bytes | str, *, old_keys: tuple[bytes | str, ...] = ()) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        keys = [_key_bytes(k) for k in (key, *old_keys)]
        self._by_id = {hashlib.sha256(k).digest()[:8]: AESGCM(k) for k in keys}
        self._current = hashlib.sha256(keys[0]).digest()[:8]

    @staticmethod
    def generate_key() -> str:
        """Return a new random key, as base64 text to keep in a secret store."""
        return base64.urlsafe_b64encode(os.urandom(32)).decode()

    def encode(self, data: bytes) -> bytes:
        """Encrypt ``data`` with the current key."""
        nonce = os.urandom(12)
        return self._current + nonce + self._by_id[self._current].encrypt(nonce, data, None)

    def decode(self, data: bytes) -> bytes:
        """Decrypt ``data``, with whichever of the keys encrypted it."""
        from cryptography.exceptions import InvalidTag

        key_id, nonce, sealed = data[:8], data[8:20], data[20:]
        aead = self._by_id.get(key_id)
        if aead is None:
            raise CodecError(
                f"a value was encrypted with key {key_id.hex()}, which this codec does not "
                "hold: pass that key in old_keys"
            )
        try:
            return bytes(aead.decrypt(nonce, sealed, None))
        except InvalidTag as exc:
            raise CodecError(
                f"a value encrypted with key {key_id.hex()} does not decrypt: it was changed "
                "in the store"
            ) from exc


class Chain:
    """Apply codecs in turn when encoding, in reverse when decoding."""

    def __init__(self, *codecs: Codec) -> None:
        if not codecs:
            raise InvalidArgument("Chain() needs at least one codec")
        self.codecs = codecs
        self.name = "+".join(c.name for c in codecs)

    def encode(self, data: bytes) -> bytes:
        """Encode with each codec in order."""
        for codec in self.codecs:
            data = codec.encode(data)
        return data

    def decode(self, data: bytes) -> bytes:
        """Decode with each codec in reverse order."""
        for codec in reversed(self.codecs):
            data = codec.decode(data)
        return data


def seal(codec: Codec, value: Any) -> dict[str, str]:
    """Return what the store keeps for a value: the codec's name and its output."""
    data = codec.encode(orjson.dumps(value))
    return {MARK: codec.name, "b": base64.b64encode(data).decode()}


def unseal(codec: Codec, value: Any) -> Any:
    """Return the value a sealed object holds; anything else is returned as it is."""
    if not (isinstance(value, dict) and len(value) == 2 and MARK in value and "b" in value):
        return value
    if value[MARK] != codec.name:
        raise CodecError(
            f"a value was encoded with codec {value[MARK]!r}, but this store's codec is "
            f"{codec.name!r}: open the store with the codec that wrote it"
        )
    try:
        data = base64.b64decode(value["b"], validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise CodecError(f"a sealed value is not base64: {exc}") from exc
    return orjson.loads(codec.decode(data))
