"""Secrets: job tokens, watch tokens and API keys' hashed form. Pure code.

A job token lets a batch job post events for its own job; a watch token lets a
browser watch one job. Both are HMACs of the job id with the server's secret,
so any server process can check them without a lookup, and a check never
tells whether the job exists.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

API_KEY_HASH_PREFIX = "sha256:"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def _mac(secret: str, purpose: str, job_id: str) -> str:
    digest = hmac.new(secret.encode(), f"{purpose}:{job_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def job_token(secret: str, job_id: str) -> str:
    return _mac(secret, "job", job_id)


def element_token(secret: str, job_id: str, index: int) -> str:
    """Array element ``index``'s job token: ``INDEX.MAC``, so that the server knows, from
    the token alone, which element sent an event (docs/arrays.md)."""
    return f"{index}.{_mac(secret, 'element', f'{job_id}[{index}]')}"


def element_of(secret: str, job_id: str, given: str) -> int | None:
    """The element whose token ``given`` is (None: not an element's token, or a wrong one)."""
    index, dot, _ = given.partition(".")
    if not dot or not index.isdigit() or len(index) > 7:
        return None
    return int(index) if same_secret(element_token(secret, job_id, int(index)), given) else None


def watch_token(secret: str, job_id: str) -> str:
    return _mac(secret, "watch", job_id)


def same_secret(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())


def hash_api_key(key: str) -> str:
    """The form to put in ``api_keys`` or a ``[server.keys.NAME]`` key, so that the
    configuration holds no usable key."""
    return API_KEY_HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()
