"""Credentials: random tokens, their hashes at rest, constant-time checks, bearer headers."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import HTTPException, Request


def new_token(nbytes: int = 32) -> str:
    """A random URL-safe secret (256 bits by default)."""
    return secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    """sha256 of a token: what is stored at rest, so a Redis dump leaks no usable credential.

    Tokens are 256-bit random, so a fast unsalted hash is enough (no dictionary to attack).
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_matches(token: str, stored_hash: str) -> bool:
    """Constant-time comparison of a presented token against a stored hash."""
    return hmac.compare_digest(hash_token(token), stored_hash)


def secret_matches(presented: str, secret: str) -> bool:
    """Constant-time comparison of two plaintext secrets (admin token, bootstrap secret)."""
    return hmac.compare_digest(presented.encode("utf-8"), secret.encode("utf-8"))


def bearer_token(request: Request) -> str:
    """The bearer token of a request, or 401 when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
