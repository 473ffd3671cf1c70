"""API keys of the HTTP ingress: which key (if any) a request carries, and the owner id it stands for.

Every route but `/healthz` (and `/metrics` when `auth.metrics_public`) needs a configured key. Keys are
compared in constant time (`hmac.compare_digest`, against every configured key, no early exit), and a
job belongs to the key that submitted it: the owner id is a hash of the key, stored with the job, so a
request with another key sees a 404 for it (its existence is not revealed either). With no key
configured the server is open and every job is everyone's (owner None).
"""

from __future__ import annotations

import hashlib
import hmac

from entropyinfer.cluster.http_errors import HTTPError

UNAUTHORIZED = "missing or wrong API key: send `Authorization: Bearer <key>`"


def owner_id(key: str) -> str:
    """A stable id of a key that does not reveal it (stored with the jobs the key submits)."""
    return "key-" + hashlib.sha256(b"entropyinfer-owner\0" + key.encode()).hexdigest()[:24]


class KeyRing:
    """The configured API keys; `owner(authorization_header)` is the caller's owner id or a 401."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = tuple(k.encode() for k in keys if k)

    @property
    def open(self) -> bool:
        return not self._keys

    def owner(self, authorization: str | None) -> str | None:
        """The owner id of the key in an `Authorization: Bearer <key>` header; None when no key is
        configured; HTTPError 401 when the header is missing or its key is not configured."""
        if not self._keys:
            return None
        header = authorization or ""
        token = header[7:].strip().encode() if header[:7].lower() == "bearer " else b""
        matched: bytes | None = None
        for key in self._keys:  # every key is compared: the time does not say which one matched
            if hmac.compare_digest(token, key) and token:
                matched = key
        if matched is None:
            raise HTTPError(401, UNAUTHORIZED, "authentication_error")
        return owner_id(matched.decode())
