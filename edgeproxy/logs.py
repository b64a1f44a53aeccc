"""The relay's own log lines: JSON on stderr, one object a line (journald keeps them).

A module of its own so that the supervisor can set logging up without importing the
worker's modules: it starts its workers first, and they import those themselves.
"""

from __future__ import annotations

import logging
import sys

import orjson


def setup_logging() -> None:
    """JSON lines on stderr; the access log goes to stdout on its own (``accesslog``)."""
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(_JsonFormatter())
    root = logging.getLogger("edgeproxy")
    root.addHandler(err)
    root.setLevel(logging.INFO)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{"):
            return '{"level":"%s",%s' % (record.levelname.lower(), message[1:])  # noqa: UP031
        return orjson.dumps({"level": record.levelname.lower(), "message": message}).decode()
