"""HTTP headers as both sides of the relay keep them: one class for requests (``http11``)
and upstream responses (``upstream_client``).

Names are stored lower-cased; ``get`` and ``in`` take any case. A repeated header keeps
its first value, as the callers only read single-valued headers. The repr names the
headers but never shows a value: an Authorization or API key must not reach a log.
"""

from __future__ import annotations

from typing import Any


class Headers(dict[str, str]):
    __slots__ = ()

    def add(self, name: str, value: str) -> None:
        """Store a header as parsed: ``name`` already lower-cased; the first value wins."""
        self.setdefault(name, value)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())

    def __repr__(self) -> str:
        return f"<Headers {sorted(self)}>"  # names only: values may be secrets
