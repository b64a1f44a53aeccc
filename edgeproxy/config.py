"""relay.yaml -> frozen dataclasses.

Job: read the YAML, expand ``${VAR}`` / ``${VAR:-default}`` in every string, turn durations
into seconds and sizes into bytes, validate every key, and raise ``ConfigError`` with a
one-line message naming the file and the YAML path.

Rules: this module never touches sockets, SQLite or the event loop, and it is the only
module that imports ``yaml``. Field names equal the SPEC's YAML keys; values are already in
seconds (``*_s`` is implied by the SPEC's duration keys) and bytes. A value that may be a
secret (api_keys, admin_token, headers) never appears in an error message or a summary.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

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
    base_url: str = field(repr=False)  # no trailing slash; may carry credentials, so no repr
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
    # Usage rows older than this are deleted (seconds; 0 = keep forever). 400 days: 13
    # months, so a month can still be compared with the same month a year before.
    usage_retention: float = 400 * 86400.0
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


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate relay.yaml. Raises ConfigError (one line) on any problem."""
    file = os.fspath(path)  # as the user spelled it: error lines name it that way
    try:
        tree = _parse(_read(file))
        tree = _expand(tree, "", os.environ if env is None else env, {})
        return _build(tree, os.path.abspath(file))
    except _Invalid as exc:
        raise ConfigError(file, exc.path, exc.problem) from None


def summary(config: Config) -> list[str]:
    """Human lines for `edgeproxy check`. Never shows a key, a token or a full base_url."""
    metrics = _addr(config.metrics_listen) if config.metrics_listen else "off"
    lines = [
        f"config: {config.path}",
        f"listen: {_addr(config.listen)} (metrics: {metrics})",
        f"workers: {config.workers}",
        f"database: {config.database}",
        f"admin API: {'on' if config.admin_token else 'off (admin_token is empty)'}",
        f"upstreams: {len(config.upstreams)} usable",
    ]
    lines += [f"  {_describe_upstream(u)}" for u in config.upstreams]
    lines.append(f"models: {len(config.models)} in the catalogue")
    lines += [f"  {rule.pattern}: {_describe_rule(rule)}" for rule in config.models]
    lines += [f"warning: {warning}" for warning in config.warnings]
    lines.append("routes (public model -> upstreams, lowest priority first):")
    for name, serving in _routes(config):
        targets = ", ".join(f"{u.name} (priority {u.priority}, weight {u.weight})" for u in serving)
        rule = config.model_rule(name)
        unpriced = "" if rule and rule.price else " [no price: not billed]"
        lines.append(f"  {name} -> {targets or 'nothing: no usable upstream serves it'}{unpriced}")
    return lines


# --- reading and parsing ---------------------------------------------------------------


class _Invalid(Exception):
    """Raised by the helpers below; load_config adds the file name and makes a ConfigError."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path, self.problem = path, problem


_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml when built with it
    """SafeLoader with YAML 1.2 scalars. In YAML 1.1 `on`/`off`/`yes`/`no` are booleans,
    so `retry: {on: [...]}` would get the key True and `stream_usage: off` the value
    False; and `anthropic-version: 2023-06-01` would become a date. Here only true/false
    are booleans and dates stay strings. Duplicate keys are an error, not a silent override."""

    yaml_implicit_resolvers = {  # noqa: RUF012 -- PyYAML's own class attribute
        first: [(tag, rx) for tag, rx in rules if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
        for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _read(file: str) -> str:
    try:
        data = Path(file).read_bytes()
    except FileNotFoundError:
        raise _Invalid("", "no such file") from None
    except OSError as exc:
        raise _Invalid("", f"cannot read it: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Invalid("", f"is not UTF-8 text (bad byte at offset {exc.start})") from None


def _parse(text: str) -> dict[Any, Any]:
    try:
        tree = yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = _one_line(exc.problem or exc.context)
        raise _Invalid("", f"YAML syntax error{where}: {problem}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # e.g. a 5000-digit integer
        raise _Invalid("", f"YAML syntax error: {_one_line(str(exc))}") from None
    except (AttributeError, KeyError, TypeError):  # PyYAML: `!!timestamp x`, `!!bool x`
        raise _Invalid("", "YAML syntax error: a value does not fit its explicit !!tag") from None
    if tree is None:
        raise _Invalid("", "file is empty; see the shipped relay.yaml for every key")
    if not isinstance(tree, dict):
        raise _Invalid("", f"the top level must be a mapping of keys, got {_got(tree, '')}")
    return tree


def _one_line(text: str | None) -> str:
    return " ".join((text or "invalid YAML").split())


# --- ${VAR} expansion --------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _expand(node: Any, path: str, env: Mapping[str, str], done: dict[int, Any]) -> Any:
    """Expand every string value after parsing, so a variable can never inject YAML. Keys
    are names, not values, and stay as written. `done` expands a node shared by YAML
    aliases once (no exponential walk) and catches an alias that contains itself."""
    if isinstance(node, str):
        return _expand_str(node, path, env)
    if not isinstance(node, dict | list):
        return node
    if id(node) in done:
        if done[id(node)] is None:
            raise _Invalid(path, "a YAML alias refers to itself")
        return done[id(node)]
    done[id(node)] = None
    if isinstance(node, dict):
        out: Any = {k: _expand(v, _join(path, str(k)), env, done) for k, v in node.items()}
    else:
        out = [_expand(v, f"{path}[{i}]", env, done) for i, v in enumerate(node)]
    done[id(node)] = out
    return out


def _expand_str(text: str, path: str, env: Mapping[str, str]) -> str:
    if "${" not in text:
        return text
    if "${" in _VAR.sub("", text):  # a typo like ${OPENAI_KEY must not become a literal key
        raise _Invalid(path, "malformed ${...}: write ${NAME} or ${NAME:-default}")

    def value(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        # Like the shell: `:-` also applies when the variable is set but empty.
        if env.get(name):
            return env[name]
        if default is not None:
            return default
        if name in env:
            return ""
        raise _Invalid(path, f"environment variable {name} is not set and has no default")

    return _VAR.sub(value, text)


# --- scalar converters: (value, yaml_path) -> python value, or raise _Invalid ------------

_SECRET_PATH = re.compile(r"(^|\.)(api_keys|admin_token|headers)\b")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True}
_BOOLS |= {"false": False, "no": False, "off": False, "0": False}
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DAYS = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*d", re.IGNORECASE)
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 10**3, "kib": 2**10, "mb": 10**6, "mib": 2**20, "gb": 10**9}
_SIZE_UNITS["gib"] = 2**30
_LISTEN = re.compile(r"(?:\[([^\]\s]+)\]|([^:\[\]\s]*)):([0-9]+)")
_NAME = re.compile(r"[A-Za-z0-9._-]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token
# The relay sets these itself: the upstream's own key from api_keys, and the framing.
_RELAY_HEADERS = {"authorization", "x-api-key", "x-goog-api-key", "host", "content-length"}
_RELAY_HEADERS |= {"transfer-encoding", "connection"}


def _got(value: Any, path: str) -> str:
    """How an error message shows the given value: short, and never a secret."""
    if _SECRET_PATH.search(path) or (path.endswith("base_url") and "@" in str(value)):
        kind = {str: "a string", int: "an integer", float: "a number"}.get(type(value), "a value")
        return f"{kind} (value hidden)"
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    if not isinstance(value, str | int | float):
        return f"a {type(value).__name__}"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _str(value: Any, path: str, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"must be a string, got {_got(value, path)}")
    if not empty and not value.strip():
        raise _Invalid(path, "must not be empty")
    return value


def _int(value: Any, path: str, minimum: int = 1) -> int:
    # Digit strings are accepted because ${VAR} expansion always yields strings.
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,18}", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}[minimum]
        raise _Invalid(path, f"must be {what}, got {_got(value, path)}")
    return value


def _bool(value: Any, path: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str | int) and str(value).strip().lower() in _BOOLS:
        return _BOOLS[str(value).strip().lower()]
    raise _Invalid(path, f"must be true or false, got {_got(value, path)}")


def _duration(value: Any, path: str, positive: bool = True) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)  # a bare number is seconds
    elif isinstance(value, str) and (match := _DURATION.fullmatch(value.strip())):
        seconds = float(match[1]) * _DURATION_UNITS[(match[2] or "s").lower()]
    else:
        got = _got(value, path)
        raise _Invalid(path, f"duration must look like 200ms, 30s, 5m or 1h, got {got}")
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        what = "positive" if positive else "non-negative"
        raise _Invalid(path, f"must be a {what} duration, got {_got(value, path)}")
    return seconds


def _retention(value: Any, path: str) -> float:
    """A duration that also takes days (``400d``), or 0 to keep usage forever.

    Anything from 0 to a day is refused: ``13m`` is 13 minutes, not months, and would
    delete the billing history within the hour."""
    match = _DAYS.fullmatch(value.strip()) if isinstance(value, str) else None
    try:
        seconds = float(match[1]) * 86400.0 if match else _duration(value, path, positive=False)
    except _Invalid:
        seconds = -1.0
    if not (seconds == 0 or (math.isfinite(seconds) and seconds >= 86400.0)):
        got = _got(value, path)
        raise _Invalid(path, f"must be 0 (keep forever) or at least 1d, e.g. 400d, got {got}")
    return seconds


def _size(value: Any, path: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (match := _SIZE.fullmatch(value.strip())):
        scaled = float(match[1]) * _SIZE_UNITS[(match[2] or "B").lower()]
        size = int(scaled) if math.isfinite(scaled) else -1
    else:
        got = _got(value, path)
        raise _Invalid(path, f"size must look like 512KB, 32MiB or 1GB, got {got}")
    if size < 1:
        raise _Invalid(path, f"must be a positive size, got {_got(value, path)}")
    return size


def _number(value: Any, path: str) -> float:
    if isinstance(value, str) and re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", value.strip()):
        value = float(value)
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:  # no bools
        got = _got(value, path)
        raise _Invalid(path, f"must be a non-negative number (USD per 1M tokens), got {got}")
    return float(value)


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], str]:
    def convert(value: Any, path: str) -> str:
        if isinstance(value, str) and value.strip() in options:
            return value.strip()
        raise _Invalid(path, f"must be one of {', '.join(options)}, got {_got(value, path)}")

    return convert


def _listen(value: Any, path: str) -> tuple[str, int]:
    match = _LISTEN.fullmatch(value.strip()) if isinstance(value, str) else None
    if not match:
        got = _got(value, path)
        raise _Invalid(path, f"must look like host:port, [::1]:port or :port, got {got}")
    port = int(match[3]) if len(match[3]) <= 5 else 0
    if not 1 <= port <= 65535:
        raise _Invalid(path, f"port must be 1..65535, got {match[3]}")
    return match[1] or match[2] or "0.0.0.0", port


def _metrics_listen(value: Any, path: str) -> tuple[str, int] | None:
    if value is False or (isinstance(value, str) and value.strip().lower() in ("", "off", "false")):
        return None
    return _listen(value, path)


def _workers(value: Any, path: str) -> int:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return os.cpu_count() or 1
    try:
        return _int(value, path)
    except _Invalid:
        got = _got(value, path)
        raise _Invalid(path, f'must be a positive integer or "auto", got {got}') from None


def _database(value: Any, path: str, config_path: str) -> str:
    name = _str(value, path).strip()
    if name == ":memory:":
        raise _Invalid(path, "must be a file path; ':memory:' would lose the ledger on restart")
    where = os.path.dirname(config_path)  # relative to relay.yaml, not to the cwd
    return os.path.normpath(os.path.join(where, os.path.expanduser(name)))


def _url(value: Any, path: str) -> str:
    url = _str(value, path).strip().rstrip("/")
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # e.g. a port that is not a number
        ok = False
    if not ok or re.search(r"\s", url):
        raise _Invalid(path, f"must be an http:// or https:// URL, got {_got(value, path)}")
    if parts.query or parts.fragment:
        raise _Invalid(path, "must not carry a ?query or #fragment")
    return url


def _name(value: Any, path: str) -> str:
    name = _str(value, path)
    if not _NAME.fullmatch(name):
        got = _got(value, path)
        raise _Invalid(path, f"must be letters, digits, '.', '_' or '-' only, got {got}")
    return name


# --- collection converters ---------------------------------------------------------------


def _str_list(value: Any, path: str, non_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or (non_empty and not value):
        what = "a non-empty list" if non_empty else "a list"
        raise _Invalid(path, f"must be {what} of strings, got {_got(value, path)}")
    return tuple(_str(item, f"{path}[{i}]").strip() for i, item in enumerate(value))


def _str_map(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping of strings to strings, got {_got(value, path)}")
    for key in value:
        _str(key, path)  # a key like `4:` parses as an int
    return {key: _str(item, _join(path, key)) for key, item in value.items()}


def _api_keys(value: Any, path: str) -> tuple[str, ...]:
    # A single string may carry several keys separated by commas (one env var, many keys).
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Invalid(path, f"must be a list of strings, got {_got(value, path)}")
    keys = []
    for i, item in enumerate(items):
        key = _str(item, f"{path}[{i}]", empty=True).strip()
        if re.search(r"[\s\x00-\x1f\x7f]", key):
            raise _Invalid(f"{path}[{i}]", "must not contain whitespace or control characters")
        if key:  # "${OPENAI_API_KEY:-}" expands to "" when unset: dropped, not an error
            keys.append(key)
    return tuple(keys)


def _headers(value: Any, path: str) -> dict[str, str]:
    headers = _str_map(value, path)
    for name, text in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise _Invalid(path, f"{name!r} is not a valid header name")
        if name.lower() in _RELAY_HEADERS:
            raise _Invalid(_join(path, name), "is set by the relay itself (keys go in api_keys)")
        if re.search(r"[\r\n\x00]", text):
            raise _Invalid(_join(path, name), "must not contain line breaks")
    return headers


def _retry_on(value: Any, path: str) -> frozenset[int | str]:
    if not isinstance(value, list):
        raise _Invalid(path, f"must be a list of statuses and words, got {_got(value, path)}")
    reasons: set[int | str] = set()
    for i, item in enumerate(value):
        if isinstance(item, str) and re.fullmatch(r"[0-9]{3}", item.strip()):
            item = int(item)
        if (isinstance(item, str) and item in RETRY_ON_WORDS) or (
            type(item) is int and 400 <= item <= 599
        ):
            reasons.add(item)
            continue
        words = ", ".join(RETRY_ON_WORDS)
        got = _got(item, f"{path}[{i}]")
        raise _Invalid(
            f"{path}[{i}]", f"must be an HTTP status 400..599 or one of {words}, got {got}"
        )
    return frozenset(reasons)


# --- sections ------------------------------------------------------------------------------

Converter = Callable[[Any, str], Any]


def _join(path: str, key: str) -> str:
    """`upstreams[2]` + `weight`; keys that are not plain words are quoted: models."gpt-5*"."""
    part = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _fields(node: Any, path: str, allowed: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping holding only known keys; null means empty."""
    if node is None:
        return {}
    if not isinstance(node, dict):
        raise _Invalid(path, f"must be a mapping, got {_got(node, path)}")
    for key in node:
        if not isinstance(key, str):
            raise _Invalid(path, f"keys must be strings, got {_got(key, '')}")
        if key not in allowed:
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "expected " + ", ".join(allowed)
            raise _Invalid(path, f"unknown key {key!r} ({hint})")
    return node


def _section(
    node: Any, path: str, converters: Mapping[str, Converter], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Convert the keys given; a null value counts as not given (the dataclass default)."""
    node = _fields(node, path, converters)
    for key in required:
        if node.get(key) is None:
            raise _Invalid(_join(path, key), "is required")
    return {k: converters[k](v, _join(path, k)) for k, v in node.items() if v is not None}


_NON_NEGATIVE_DURATION = partial(_duration, positive=False)
_TIMEOUTS: dict[str, Converter] = {name: _duration for name in Timeouts.__dataclass_fields__}
_RETRY: dict[str, Converter] = {
    "attempts": _int,
    "backoff": _NON_NEGATIVE_DURATION,
    "max_backoff": _NON_NEGATIVE_DURATION,
    "on": _retry_on,
}
_HEALTH: dict[str, Converter] = {"eject_after": _int, "eject_for": _duration}
_PRICE: dict[str, Converter] = {name: _number for name in Price.__dataclass_fields__}
_PARAMS: dict[str, Converter] = {"rename": _str_map, "drop": _str_list}
_UPSTREAM: dict[str, Converter] = {
    "name": _name,
    "kind": _choice(KINDS),
    "base_url": _url,
    "api_keys": _api_keys,
    "models": partial(_str_list, non_empty=True),
    "model_map": _str_map,
    "weight": _int,
    "priority": partial(_int, minimum=0),
    "headers": _headers,
    "stream_usage": _choice(("inject", "off")),
    "timeouts": lambda value, path: _section(value, path, _TIMEOUTS),
    "enabled": _bool,
}
_UPSTREAM_REQUIRED = ("name", "kind", "base_url", "api_keys", "models")


def _retry(value: Any, path: str) -> Retry:
    retry = Retry(**_section(value, path, _RETRY))
    if retry.max_backoff < retry.backoff:
        problem = f"must be at least retry.backoff ({retry.backoff:g}s), got {retry.max_backoff:g}s"
        raise _Invalid(_join(path, "max_backoff"), problem)
    return retry


def _price(value: Any, path: str) -> Price:
    return Price(**_section(value, path, _PRICE))


def _params(value: Any, path: str) -> Params:
    return Params(**_section(value, path, _PARAMS))


def _catalogue(value: Any, path: str) -> tuple[ModelRule, ...]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"must be a mapping of model names, got {_got(value, path)}")
    rules = []
    for pattern, entry in value.items():  # dicts keep file order, and so does Config.models
        if not isinstance(pattern, str) or not pattern.strip():
            raise _Invalid(path, f"model names must be non-empty strings, got {_got(pattern, '')}")
        given = _section(entry, _join(path, pattern), {"price": _price, "params": _params})
        rules.append(ModelRule(pattern, **given))
    return tuple(rules)


def _upstreams(value: Any, timeouts: Timeouts, warnings: list[str]) -> tuple[Upstream, ...]:
    """The usable upstreams; a disabled one, or one without a key, only adds a warning."""
    if not isinstance(value, list):
        raise _Invalid("upstreams", f"must be a list of upstreams, got {_got(value, '')}")
    usable, names = [], set()
    for i, node in enumerate(value):
        path = f"upstreams[{i}]"
        given = _section(node, path, _UPSTREAM, required=_UPSTREAM_REQUIRED)
        if given["name"] in names:
            raise _Invalid(f"{path}.name", f"duplicate upstream name {given['name']!r}")
        names.add(given["name"])
        given["timeouts"] = replace(timeouts, **given.get("timeouts", {}))
        label = f"{path} ({given['name']})"
        if not given.get("enabled", True):
            warnings.append(f"{label}: enabled is false; skipped")
        elif not given["api_keys"]:
            warnings.append(f"{label}: every api_key is empty; skipped")
        else:
            usable.append(Upstream(**given))
    return tuple(usable)


_TOP: dict[str, Converter] = {
    "listen": _listen,
    "metrics_listen": _metrics_listen,
    "workers": _workers,
    "database": _str,  # resolved against the file's directory in _build
    "admin_token": partial(_str, empty=True),
    "max_request_body": _size,
    "max_connections": _int,
    "max_inflight": _int,
    "shutdown_grace": _NON_NEGATIVE_DURATION,
    "usage_retention": _retention,
    "metrics": lambda value, path: MetricsConfig(**_section(value, path, {"per_key": _bool})),
    "timeouts": lambda value, path: Timeouts(**_section(value, path, _TIMEOUTS)),
    "retry": _retry,
    "health": lambda value, path: Health(**_section(value, path, _HEALTH)),
    "upstreams": lambda value, path: value,  # needs the global timeouts: done in _build
    "models": _catalogue,
}


def _build(tree: dict[Any, Any], config_path: str) -> Config:
    given = _section(tree, "", _TOP)
    if "metrics_listen" in tree and tree["metrics_listen"] is None:
        given["metrics_listen"] = None  # an explicit null turns metrics off; a missing key doesn't
    database = tree.get("database") or "edgeproxy.db"
    given["database"] = _database(database, "database", config_path)
    warnings: list[str] = []
    timeouts = given.get("timeouts", Timeouts())
    given["upstreams"] = _upstreams(given.get("upstreams", []), timeouts, warnings)
    if not given["upstreams"]:
        warnings.append("no usable upstream: model requests get 503 until one is configured")
    return Config(path=config_path, warnings=tuple(warnings), **given)


# --- summary helpers -------------------------------------------------------------------------


def _addr(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe_upstream(upstream: Upstream) -> str:
    parts = urlsplit(upstream.base_url)  # scheme and host only: no path, no userinfo
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    where = f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")
    keys = len(upstream.api_keys)
    text = (
        f"{upstream.name}: {upstream.kind} at {where}, models {', '.join(upstream.models)}, "
        f"weight {upstream.weight}, priority {upstream.priority}, "
        f"{keys} api key{'s' if keys != 1 else ''}"
    )
    if upstream.model_map:
        text += f", maps {', '.join(f'{k}->{v}' for k, v in upstream.model_map.items())}"
    if upstream.headers:
        text += f", extra headers {', '.join(upstream.headers)}"  # names only
    return text


def _describe_rule(rule: ModelRule) -> str:
    price = rule.price
    if price is None:
        text = "no price (not billed)"
    else:
        text = f"USD per 1M tokens: input {price.input:g}, output {price.output:g}"
        if price.cached_input is not None:
            text += f", cached input {price.cached_input:g}"
        if price.cache_write is not None:
            text += f", cache write {price.cache_write:g}"
    if rule.params.rename:
        text += "; rename " + ", ".join(f"{a}->{b}" for a, b in rule.params.rename.items())
    if rule.params.drop:
        text += "; drop " + ", ".join(rule.params.drop)
    return text


def _routes(config: Config) -> Iterator[tuple[str, list[Upstream]]]:
    """Every public name the config knows: upstream models first, then catalogue entries."""
    names = [m for u in config.upstreams for m in u.models] + [r.pattern for r in config.models]
    for name in dict.fromkeys(names):
        serving = [u for u in config.upstreams if u.serves(name)]
        yield name, sorted(serving, key=lambda u: u.priority)
