"""Signed, expiring session tokens (HMAC-SHA256), so a restarted coordinator still knows
its devices: the signing key lives in the state store, not in memory.

A token is `base64url(payload).base64url(signature)` with payload
`{"sub": client_id, "aud": audience, "exp": unix_seconds, "jti": random}`. The audience
keeps a device token from being accepted anywhere but the edge service.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from rankfed.coordinator.errors import AuthError

EDGE_AUDIENCE = "edge"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class TokenClaims:
    client_id: str
    audience: str
    expires_at: float


class TokenSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("token signing key must be at least 32 bytes")
        self._key = key

    @staticmethod
    def new_key() -> bytes:
        return secrets.token_bytes(32)

    def issue(self, client_id: str, *, audience: str, ttl_seconds: float, now: float | None = None) -> tuple[str, float]:
        expires_at = (time.time() if now is None else now) + ttl_seconds
        payload = json.dumps(
            {"sub": client_id, "aud": audience, "exp": round(expires_at, 3), "jti": secrets.token_hex(8)},
            separators=(",", ":"),
        ).encode()
        body = _b64(payload)
        return f"{body}.{self._sign(body)}", expires_at

    def verify(self, token: str, *, audience: str, now: float | None = None) -> TokenClaims:
        body, dot, signature = token.partition(".")
        if not dot or not body or not signature:
            raise AuthError("malformed session token; join again to get a new one")
        if not hmac.compare_digest(signature, self._sign(body)):
            raise AuthError("session token signature is invalid (forged, or issued by another coordinator); join again")
        try:
            claims = json.loads(_unb64(body))
            client_id, aud, exp = str(claims["sub"]), str(claims["aud"]), float(claims["exp"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError("malformed session token payload; join again") from exc
        if aud != audience:
            raise AuthError(f"token was issued for the {aud!r} service, not {audience!r}")
        if exp < (time.time() if now is None else now):
            raise AuthError("session token expired; join again with the same device name to keep your client id")
        return TokenClaims(client_id=client_id, audience=aud, expires_at=exp)

    def _sign(self, body: str) -> str:
        return _b64(hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest())


def bearer_token(metadata: Mapping[str, str | bytes]) -> str | None:
    """The token from an `authorization: Bearer <token>` metadata entry, if any."""
    value = metadata.get("authorization", "")
    if not isinstance(value, str):  # gRPC gives bytes only for "-bin" keys
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
