"""Request signing for Binance's signed endpoints: HMAC-SHA256 or Ed25519, keys from the environment.

Binance signs the request's query string (``totalParams``): HMAC-SHA256 gives a hex digest, Ed25519 a base64
signature. :func:`signer_from_env` reads the keys from the environment and nowhere else:

``BINANCE_API_KEY``            the API key (sent in ``X-MBX-APIKEY``)
``BINANCE_API_SECRET``         its HMAC secret, or
``BINANCE_PRIVATE_KEY_FILE``   a PEM file with its Ed25519 private key (``BINANCE_PRIVATE_KEY_PASSWORD`` if
                               the file is encrypted)

Signers never show their keys: ``repr()`` and ``str()`` name the kind and a short fingerprint of the API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from typing import Any

from kimiha.error import InvalidConfigurationError

__all__ = ["Ed25519Signer", "HmacSigner", "Signer", "signer_from_env"]


def _fingerprint(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:8]


class Signer:
    """Base of the signers: ``api_key`` and ``sign(payload) -> str``."""

    kind = "none"

    def __init__(self, api_key: str) -> None:
        if not isinstance(api_key, str) or not api_key:
            raise InvalidConfigurationError("Binance signer: the API key must be a non-empty string")
        self.api_key = api_key

    def sign(self, payload: str) -> str:
        """Return the signature of ``payload`` (the query string) as Binance expects it."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(api key sha256 {_fingerprint(self.api_key)}...)"

    __str__ = __repr__


class HmacSigner(Signer):
    """HMAC-SHA256 with the API secret; the signature is the hex digest."""

    kind = "hmac"

    def __init__(self, api_key: str, secret: str) -> None:
        super().__init__(api_key)
        if not isinstance(secret, str) or not secret:
            raise InvalidConfigurationError("Binance HMAC signer: the API secret must be a non-empty string")
        self._secret = secret.encode()

    def sign(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()


class Ed25519Signer(Signer):
    """Ed25519 with a private key (``cryptography``); the signature is base64."""

    kind = "ed25519"

    def __init__(self, api_key: str, private_key: Any) -> None:
        super().__init__(api_key)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        if not isinstance(private_key, Ed25519PrivateKey):
            raise InvalidConfigurationError(f"Binance Ed25519 signer: expected an Ed25519 private key, got "
                                            f"{type(private_key).__name__}")
        self._key = private_key

    @classmethod
    def from_pem(cls, api_key: str, pem: bytes, password: bytes | None = None) -> Ed25519Signer:
        """Load the private key from PEM bytes."""
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(pem, password=password)
        except (ValueError, TypeError) as exc:
            raise InvalidConfigurationError(f"Binance Ed25519 signer: cannot load the private key: {exc}") from None
        return cls(api_key, key)

    def sign(self, payload: str) -> str:
        return base64.b64encode(self._key.sign(payload.encode())).decode()


def signer_from_env(environ: Mapping[str, str] | None = None) -> Signer:
    """Return the signer the environment describes (see the module's table).

    Raises
    ------
    InvalidConfigurationError
        When ``BINANCE_API_KEY`` is missing, when neither a secret nor a key file is given, or when both are,
        or when the key file cannot be read; the message names the variables, never their values.
    """
    env = os.environ if environ is None else environ
    api_key = env.get("BINANCE_API_KEY", "")
    secret = env.get("BINANCE_API_SECRET", "")
    key_file = env.get("BINANCE_PRIVATE_KEY_FILE", "")
    if not api_key:
        raise InvalidConfigurationError(
            "the Binance executor needs BINANCE_API_KEY in the environment, with BINANCE_API_SECRET (HMAC) or "
            "BINANCE_PRIVATE_KEY_FILE (Ed25519)")
    if secret and key_file:
        raise InvalidConfigurationError(
            "set one of BINANCE_API_SECRET (HMAC) and BINANCE_PRIVATE_KEY_FILE (Ed25519), not both")
    if secret:
        return HmacSigner(api_key, secret)
    if key_file:
        try:
            with open(key_file, "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise InvalidConfigurationError(
                f"BINANCE_PRIVATE_KEY_FILE: cannot read the key file: {exc.strerror or exc}") from None
        password = env.get("BINANCE_PRIVATE_KEY_PASSWORD")
        return Ed25519Signer.from_pem(api_key, pem, password.encode() if password else None)
    raise InvalidConfigurationError(
        "BINANCE_API_KEY is set but neither BINANCE_API_SECRET (HMAC) nor BINANCE_PRIVATE_KEY_FILE (Ed25519) is")
