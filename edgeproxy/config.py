"""relay.yaml -> frozen dataclasses.

Job: read the YAML, expand ``${VAR}`` / ``${VAR:-default}`` in every string, turn durations
into seconds and sizes into bytes, validate every key, and raise ``ConfigError`` with a
one-line message naming the file and the YAML path.

Rules: this module never touches sockets, SQLite or the event loop, and it is the only
module that imports ``yaml``. Field names equal the SPEC's YAML keys; values are already in
seconds (``*_s`` is implied by the SPEC's duration keys) and bytes.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Kind = Literal["openai", "anthropic", "gemini"]
KINDS: tuple[str, ...] = ("openai", "anthropic", "gemini")
RETRY_ON_WORDS: tuple[str, ...] = ("connect_error", "timeout", "empty_response")


class ConfigError(Exception):
    """A bad relay.yaml. ``str()`` is the one line users see: ``file: path: problem``."""

    def __init__(self, file: str, path: str, problem: str) -> None:
        self.file, self.path, self.problem = file, path, problem
        where = f"{file}: {path}: " if path else f"{file}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 120.0
    idle: float = 120.0
    client_read: float = 30.0
    client_keepalive: float = 75.0


@dataclass(frozen=True)
class Retry:
    attempts: int = 3
    backoff: float = 0.2
    max_backoff: float = 5.0
    # HTTP statuses (ints) and the words connect_error / timeout / empty_response
    on: frozenset[int | str] = frozenset(
        {429, 500, 502, 503, 504, "connect_error", "timeout", "empty_response"}
    )


@dataclass(frozen=True)
class Health:
    eject_after: int = 5
    eject_for: float = 30.0


@dataclass(frozen=True)
class Upstream:
    name: str
    kind: Kind
    base_url: str  # no trailing slash
    api_keys: tuple[str, ...] = field(repr=False)  # non-empty strings only
    models: tuple[str, ...]  # globs of public model names
    model_map: dict[str, str] = field(default_factory=dict)
    weight: int = 1
    priority: int = 0
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    stream_usage: Literal["inject", "off"] = "inject"
    timeouts: Timeouts = field(default_factory=Timeouts)  # merged over the global ones
    enabled: bool = True

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def upstream_model(self, model: str) -> str:
        return self.model_map.get(model, model)


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens."""

    input: float = 0.0
    output: float = 0.0
    cached_input: float | None = None  # None = same as input
    cache_write: float | None = None  # None = same as input


@dataclass(frozen=True)
class Params:
    rename: dict[str, str] = field(default_factory=dict)
    drop: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rename or self.drop)


@dataclass(frozen=True)
class ModelRule:
    pattern: str  # the key in `models:`; may be a glob
    price: Price | None = None
    params: Params = field(default_factory=Params)


@dataclass(frozen=True)
class MetricsConfig:
    per_key: bool = False


@dataclass(frozen=True)
class Config:
    path: str  # the file it was loaded from, absolute
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9464)  # None = off
    workers: int = 1  # "auto" is resolved to os.cpu_count() at load
    database: str = "edgeproxy.db"  # absolute, resolved relative to the file
    admin_token: str = field(default="", repr=False)
    max_request_body: int = 32 * 1024 * 1024
    max_connections: int = 4096
    max_inflight: int = 1024
    shutdown_grace: float = 30.0
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: Retry = field(default_factory=Retry)
    health: Health = field(default_factory=Health)
    upstreams: tuple[Upstream, ...] = ()  # usable ones only (skipped ones are in warnings)
    models: tuple[ModelRule, ...] = ()  # in file order; exact names before globs on lookup
    warnings: tuple[str, ...] = ()  # e.g. "upstreams[0] (openai): every api_key is empty; skipped"

    def model_rule(self, model: str) -> ModelRule | None:
        """The catalogue entry for a public model: an exact name wins over a glob."""
        for rule in self.models:
            if rule.pattern == model:
                return rule
        for rule in self.models:
            if fnmatch.fnmatchcase(model, rule.pattern):
                return rule
        return None


def load_config(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Config:
    """Read and validate relay.yaml. Raises ConfigError (one line) on any problem."""
    raise NotImplementedError  # filled in below by the config work


# --- helpers used by load_config -------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")
_ = (Any, Path, yaml)  # imported for the loader
