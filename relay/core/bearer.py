"""`Authorization: Bearer <credential>` (RFC 6750), read the same way on every port: the SDK
port (an SDK key), the admin API (the admin token) and the peer links (the peer token)."""

from __future__ import annotations

import hmac


def bearer(header: str | None) -> str | None:
    """The credential of a Bearer `Authorization` header; None if the header is missing,
    names another scheme, or has no credential."""
    if not header:
        return None
    scheme, _, credential = header.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        return None
    return credential


def same_token(given: str, expected: str | bytes) -> bool:
    """A token compared in constant time (any text a client sends, even lone surrogates)."""
    want = expected.encode() if isinstance(expected, str) else expected
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), want)
