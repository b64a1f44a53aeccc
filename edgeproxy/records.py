"""The plain records the database holds, and the rules their values must follow.

Job: ``KeyRecord`` (a key row, with its state rules: expiry, allowlist, budget) and
``UsageRecord`` (one ledger row); secret generation, hashing and shape; validation of
the values a key may carry, shared by the CLI and the admin API; the ``DbError`` tree.

Rules: pure. No SQLite, no sockets, no loop; ``db`` stores these records and re-exports
every public name here, so callers import them from ``edgeproxy.db``. A secret is never
kept in a record, and the hash is hidden from ``repr``.

Exceptions::

    DbError                 the database cannot be opened, read or written
    ├── InvalidValue        a name, budget, limit, glob list, date or report field breaks a rule
    ├── NoSuchKey           "no key named 'bob'"
    └── KeyExists           "a key named 'alice' already exists"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from fnmatch import fnmatchcase
from typing import Any, Literal


class DbError(Exception):
    """The database failed, or a request to it broke a rule. ``str()`` is one line."""


class InvalidValue(DbError):
    """A name, budget, limit, glob list, date or report field breaks a rule."""


class NoSuchKey(DbError):
    """The named key does not exist."""


class KeyExists(DbError):
    """A key with that name already exists."""


# --- secrets ---------------------------------------------------------------------------

_SECRET_SHAPE = re.compile(r"sk-[A-Za-z0-9_-]{40,128}")
_NAME_SHAPE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_GLOB_SHAPE = re.compile(r"[^\s,]{1,256}")


def new_secret() -> str:
    """``sk-`` and 44 URL-safe characters (33 random bytes, 264 bits)."""
    return "sk-" + secrets.token_urlsafe(33)


def hash_secret(secret: str) -> str:
    """SHA-256 hex of the secret.

    A fast unsalted hash is right here, unlike for passwords: the secret is 264 random bits,
    so neither a dictionary nor brute force can invert it, and a lookup by hash must cost
    nothing on every request.
    """
    return hashlib.sha256(secret.encode()).hexdigest()


def looks_like_secret(s: str) -> bool:
    """Cheap shape check so garbage is refused without a lookup."""
    return _SECRET_SHAPE.fullmatch(s) is not None


def display_prefix(secret: str) -> str:
    """What humans see of a secret: ``sk-`` and its first 8 characters."""
    return secret[:11]


# --- key records -----------------------------------------------------------------------

KeyState = Literal["active", "disabled", "expired", "exhausted"]


def utc_today() -> date:
    return datetime.now(UTC).date()


def utc_now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: int
    name: str
    prefix: str
    secret_hash: str = field(repr=False)
    budget_usd: float | None
    spent_usd: float
    models: tuple[str, ...]  # globs; empty = every model
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    expires: date | None  # valid through the end of this UTC day
    disabled: bool
    created_at: str  # ISO 8601 UTC

    def expired(self, today: date | None = None) -> bool:
        return self.expires is not None and (today or utc_today()) > self.expires

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatchcase(model, glob) for glob in self.models)

    def exhausted(self) -> bool:
        return self.budget_usd is not None and self.spent_usd >= self.budget_usd

    def state(self, today: date | None = None) -> KeyState:
        if self.disabled:
            return "disabled"
        if self.expired(today):
            return "expired"
        return "exhausted" if self.exhausted() else "active"

    def to_json(self, today: date | None = None) -> dict[str, Any]:
        """SPEC §1 ``keys list --json`` object (never the secret or its hash)."""
        return {
            "name": self.name,
            "prefix": self.prefix,
            "budget_usd": self.budget_usd,
            "spent_usd": self.spent_usd,
            "models": list(self.models),
            "rpm": self.rpm,
            "tpm": self.tpm,
            "concurrency": self.concurrency,
            "expires": self.expires.isoformat() if self.expires else None,
            "disabled": self.disabled,
            "created_at": self.created_at,
            "state": self.state(today),
        }


# --- validation (shared by the CLI and the admin API) -----------------------------------


def check_name(name: object) -> str:
    if not isinstance(name, str) or _NAME_SHAPE.fullmatch(name) is None:
        raise InvalidValue(f"key name must be 1-64 characters of A-Z a-z 0-9 . _ @ -, got {name!r}")
    return name


def check_budget(value: object) -> float | None:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if value is None:
        return None
    if not (number and math.isfinite(value) and value >= 0):  # type: ignore[arg-type]
        raise InvalidValue(f"budget must be a non-negative number of USD, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_limit(what: str, value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidValue(f"{what} must be a positive integer, got {value!r}")
    return value


def check_models(value: object) -> tuple[str, ...]:
    """A list of globs; empty means every model. Duplicates are dropped, order kept."""
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidValue(f"models must be a list of globs, got {value!r}")
    globs: list[str] = []
    for glob in value:
        if not isinstance(glob, str) or not _GLOB_SHAPE.fullmatch(glob):
            raise InvalidValue(
                f"models: a glob must be 1-256 characters without spaces or commas, got {glob!r}"
            )
        if glob not in globs:
            globs.append(glob)
    return tuple(globs)


def check_expires(value: object) -> date | None:
    """A ``date`` or a ``YYYY-MM-DD`` string (nothing looser, such as ``20250101``)."""
    if value is None or (isinstance(value, date) and not isinstance(value, datetime)):
        return value
    if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        with contextlib.suppress(ValueError):
            return date.fromisoformat(value)
    raise InvalidValue(f"expires must be a date YYYY-MM-DD, got {value!r}")


# A key change -> (its column, the check, the column's value). The column names are fixed
# here, so SQL built from them never carries user input.
_CHANGES: dict[str, tuple[str, Callable[[Any], Any], Callable[[Any], Any]]] = {
    "budget": ("budget_usd", check_budget, lambda v: v),
    "models": ("models", check_models, lambda v: json.dumps(list(v))),
    "rpm": ("rpm", lambda v: check_limit("rpm", v), lambda v: v),
    "tpm": ("tpm", lambda v: check_limit("tpm", v), lambda v: v),
    "concurrency": ("concurrency", lambda v: check_limit("concurrency", v), lambda v: v),
    "expires": ("expires", check_expires, lambda v: v.isoformat() if v else None),
    "disabled": ("disabled", bool, int),
}
KEY_CHANGES: tuple[str, ...] = tuple(_CHANGES)


def key_columns(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate key changes (``budget``, ``models``, ...) into their column values."""
    unknown = sorted(set(changes) - set(_CHANGES))
    if unknown:
        raise InvalidValue(f"cannot change {', '.join(unknown)}; only {', '.join(_CHANGES)}")
    columns = {}
    for what, value in changes.items():
        column, check, to_column = _CHANGES[what]
        columns[column] = to_column(check(value))
    return columns


# --- usage -----------------------------------------------------------------------------


@dataclass(slots=True)
class UsageRecord:
    """One model request, SPEC §4. ``key_name`` keeps the name after the key is deleted."""

    request_id: str
    ts: float  # unix seconds
    key_id: int | None
    key_name: str | None
    model: str | None  # the public name the client asked for
    upstream: str | None  # None when no upstream was reached
    endpoint: str
    status: int
    attempts: int = 0
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False  # the upstream sent no usage, or the client left mid-stream
    # Unique per request, made by the relay. A client may send the same x-request-id twice;
    # both requests must be billed, so the ledger dedupes on this, not on request_id.
    record_id: str = ""

    def __post_init__(self) -> None:
        if not self.record_id:
            self.record_id = self.request_id
