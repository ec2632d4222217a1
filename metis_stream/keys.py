"""API keys with a name and a role, and what each one sees. Pure code.

A job records the name of the key that created it (``Job.owner``). A ``client`` key sees
only its own jobs: it lists, reads, watches and cancels those, and any other job is, to
it, a job that does not exist. An ``admin`` key sees every job. :meth:`ApiKey.sees` is the
one rule; the service applies it to every job it hands out, and a webhook can apply it
to the jobs it reports.

Keys come from two places in ``[server]``: ``[server.keys.NAME]`` tables (a key, a role)
and the older ``api_keys`` list, each of whose entries is an admin key named after its
hash (``sha256:`` and the hash's first 12 hex digits), so that a deployment that lists
keys there keeps seeing every job. :func:`keyring` joins the two and refuses a key given
twice.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from metis_stream import tokens
from metis_stream.errors import ConfigError

__all__ = [
    "ApiKey",
    "Role",
]

KEY_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
"""A named key's name: it is written on every job the key creates, and no listed key's
name (``sha256:...``) can take this form."""
HASHED_KEY = re.compile(re.escape(tokens.API_KEY_HASH_PREFIX) + r"[0-9a-f]{64}\Z")
LISTED_NAME_DIGITS = 12
"""The hex digits of a listed key's hash that name it: enough that two keys never share a
name, few enough to read."""


class Role(StrEnum):
    CLIENT = "client"
    """Sees the jobs it created, and only those."""
    ADMIN = "admin"
    """Sees every job, and the server's metrics."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key the server takes."""

    name: str
    """Written on each job the key creates (``Job.owner``)."""
    key: str = field(repr=False)
    """As configured: the key itself, or ``sha256:<hex>`` of it (``tokens.hash_api_key``)."""
    role: Role = Role.CLIENT

    @property
    def digest(self) -> str:
        """The key's ``sha256:<hex>`` form, whichever form it was configured in."""
        return (self.key if self.key.startswith(tokens.API_KEY_HASH_PREFIX)
                else tokens.hash_api_key(self.key))

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN

    def sees(self, owner: str) -> bool:
        """Whether a job created by ``owner`` exists for this key."""
        return self.admin or owner == self.name

    @property
    def owner_filter(self) -> str | None:
        """The owner that a listing for this key is limited to; None: every job."""
        return None if self.admin else self.name


KEYLESS = ApiKey(name="", key="", role=Role.ADMIN)
"""Every caller of a server without keys (``insecure_no_auth``): it sees every job, and
the jobs it creates have no owner, which only admin keys see."""


def listed_key(entry: str) -> ApiKey:
    """An ``api_keys`` entry: an admin key named after its hash."""
    key = ApiKey(name="", key=entry, role=Role.ADMIN)
    return ApiKey(name=key.digest[:len(tokens.API_KEY_HASH_PREFIX) + LISTED_NAME_DIGITS],
                  key=entry, role=Role.ADMIN)


def named_key(name: str, table: Any) -> ApiKey:
    """A ``[server.keys.NAME]`` table; ConfigError names the table and what to do."""
    where = f"[server.keys.{name}]"
    if not KEY_NAME.match(name):
        raise ConfigError(f"{where}: a key's name may have only letters, digits, _ and - "
                          "(at most 64): it is written on every job the key creates")
    if not isinstance(table, Mapping):
        raise ConfigError(f'{where} must be a table: key = "sha256:...", role = "client" '
                          'or "admin"')
    unknown = set(table) - {"key", "role"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; a key has key and role")
    key = table.get("key")
    if not isinstance(key, str) or not key.strip():
        raise ConfigError(f'{where} needs key = "sha256:..." (`metis-stream new-key` prints '
                          "a new key and that form of it)")
    role = table.get("role", Role.CLIENT.value)
    if role not in Role.__members__.values():
        raise ConfigError(f"{where}: role must be one of {', '.join(Role)}, not {role!r}: a "
                          "client key sees the jobs it created, an admin key every job")
    return ApiKey(name=name, key=key.strip(), role=Role(role))


def keyring(listed: Sequence[str], named: Iterable[ApiKey]) -> tuple[ApiKey, ...]:
    """Every key the server takes: ``api_keys`` entries (admin keys), then the named ones.
    ConfigError for a malformed ``sha256:`` entry or a key given twice: one key has one
    name and one role."""
    ring = [*map(listed_key, listed), *named]
    where: dict[str, str] = {}
    for key in ring:
        place = (f"[server.keys.{key.name}]" if KEY_NAME.match(key.name)
                 else "[server] api_keys (or METIS_API_KEYS)")
        if key.key.startswith(tokens.API_KEY_HASH_PREFIX) and not HASHED_KEY.match(key.key):
            raise ConfigError(f"{place}: {key.key[:20]}... is not a sha256: form (sha256: and "
                              "64 lowercase hex digits); `metis-stream new-key` prints one")
        if key.digest in where:
            both = (f"{place} lists the same key twice" if where[key.digest] == place
                    else f"{where[key.digest]} and {place} give the same key")
            raise ConfigError(f"{both}: a key has one name and one role; remove one of them")
        where[key.digest] = place
    return tuple(ring)


def find(ring: Iterable[ApiKey], given: str) -> ApiKey | None:
    """The key of ``ring`` that ``given`` is, or None. Every entry is compared, in constant
    time, so the time taken tells neither whether nor which key matched."""
    hashed = tokens.hash_api_key(given).encode()
    found = None
    for key in ring:
        if hmac.compare_digest(key.digest.encode(), hashed):
            found = key
    return found
