"""One immutable view of a loaded config, with everything a request needs precomputed.

Job: ``Runtime.build(config)`` does once, at load, the work a request would otherwise repeat:
per-upstream header sets for each API key, the secrets ``scrub`` must remove, the metric
label of each model name, the public model list. ``RuntimeRef`` is what the app holds;
SIGHUP swaps ``ref.current`` and a request reads it once, so a request in flight keeps the
config it started with.

It must not: do I/O. Health state lives in ``UpstreamSet`` and is carried over on reload.
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from edgeproxy.config import Config, ModelRule, Upstream
from edgeproxy.upstreams import UpstreamSet

ANTHROPIC_VERSION = "2023-06-01"
GLOB_CHARS = frozenset("*?[")


def is_glob(name: str) -> bool:
    return any(c in GLOB_CHARS for c in name)


def auth_headers(upstream: Upstream, key: str) -> dict[str, str]:
    """The headers that carry the upstream's own key, plus its configured extras."""
    if upstream.kind == "anthropic":
        base = {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}
    elif upstream.kind == "gemini":
        base = {"x-goog-api-key": key}
    else:
        base = {"Authorization": f"Bearer {key}"}
    # identity: we relay bytes as they come and meter them; never decompress upstream bodies
    return {**base, "Accept-Encoding": "identity", **upstream.headers}


@dataclass(slots=True)
class Runtime:
    config: Config
    upstreams: UpstreamSet
    headers: dict[str, dict[str, dict[str, str]]]  # upstream name -> api key -> headers
    secrets: tuple[str, ...]  # scrubbed from anything an upstream sends back
    secret_bytes: tuple[bytes, ...]  # the same, for scrubbing relayed stream bytes
    public_models: list[tuple[str, str]]  # (name, owned_by kind) for /v1/models
    loaded_at: float = field(default_factory=time.time)
    _labels: dict[str, str] = field(default_factory=dict)
    _rules: dict[str, ModelRule | None] = field(default_factory=dict)

    @classmethod
    def build(cls, config: Config, previous: Runtime | None = None) -> Runtime:
        upstreams = UpstreamSet(config.upstreams, config.health)
        if previous is not None:
            upstreams.carry_over(previous.upstreams)
        headers = {u.name: {k: auth_headers(u, k) for k in u.api_keys} for u in config.upstreams}
        secrets = _secrets(config)
        return cls(
            config=config,
            upstreams=upstreams,
            headers=headers,
            secrets=secrets,
            secret_bytes=tuple(s.encode() for s in secrets),
            public_models=_public_models(config),
        )

    def model_rule(self, model: str) -> ModelRule | None:
        try:
            return self._rules[model]
        except KeyError:
            rule = self.config.model_rule(model)
            if len(self._rules) < 10_000:
                self._rules[model] = rule
            return rule

    def model_label(self, model: str) -> str:
        """SPEC §7: a name the config knows, the glob that matched it, or ``other``."""
        label = self._labels.get(model)
        if label is None:
            label = _label(self.config, model)
            if len(self._labels) < 10_000:
                self._labels[model] = label
        return label


def _label(config: Config, model: str) -> str:
    patterns = [r.pattern for r in config.models]
    patterns += [p for u in config.upstreams for p in u.models]
    if model in patterns and not is_glob(model):
        return model
    for pattern in patterns:
        if is_glob(pattern) and fnmatch.fnmatchcase(model, pattern):
            return pattern
    return "other"


def _secrets(config: Config) -> tuple[str, ...]:
    found: set[str] = set()
    for u in config.upstreams:
        found.update(u.api_keys)
        found.add(u.base_url)
        host = urlsplit(u.base_url).hostname
        if host and host not in ("localhost",) and len(host) > 3:
            found.add(host)
        found.update(v for v in u.headers.values() if len(v) >= 8)
    # JSON may escape "/" as "\/" (PHP's json_encode does), and a message quoting such
    # JSON carries it escaped once more: scrub those spellings too
    slashed = [f for f in found if "/" in f]
    found.update(f.replace("/", "\\/") for f in slashed)
    found.update(f.replace("/", "\\\\/") for f in slashed)
    # longest first, so a URL is replaced whole before its host is
    return tuple(sorted(found, key=len, reverse=True))


def _public_models(config: Config) -> list[tuple[str, str]]:
    """Upstreams' non-glob names, then catalogue names some upstream serves."""
    seen: dict[str, str] = {}
    for u in config.upstreams:
        for name in u.models:
            if not is_glob(name):
                seen.setdefault(name, u.kind)
    for rule in config.models:
        if is_glob(rule.pattern) or rule.pattern in seen:
            continue
        for u in config.upstreams:
            if u.serves(rule.pattern):
                seen[rule.pattern] = u.kind
                break
    return list(seen.items())


class RuntimeRef:
    """The app's handle on the current Runtime; a reload replaces ``current``."""

    __slots__ = ("current",)

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime
