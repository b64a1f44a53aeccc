"""The access log: one JSON line per model request on stdout, written in batches.

Job: ``AccessLog.write(fields)`` serialises one line and queues it; the queue goes to
stdout in one ``write`` at most ``FLUSH_S`` later (or at once past ``FLUSH_BYTES``), and
on ``flush()`` at shutdown. The logging module's handler would take a lock, format and
flush stdout for every line: a syscall per request on the hot path, for a log that
journald timestamps on arrival anyway.

It must not: log anything a caller did not pass, or block (a full pipe is the OS's
buffer to deal with; lines are small).
"""

from __future__ import annotations

import asyncio
import atexit
import sys
from typing import IO, Any

import orjson

FLUSH_S = 0.25  # how far behind stdout may be
FLUSH_BYTES = 64 * 1024  # write at once past this much


class AccessLog:
    def __init__(self, out: IO[bytes] | None = None, *, enabled: bool = True) -> None:
        self.out = out if out is not None else sys.stdout.buffer
        self.enabled = enabled
        self._lines: list[bytes] = []
        self._size = 0
        self._scheduled = False
        atexit.register(self.flush)

    def write(self, fields: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = orjson.dumps(fields, option=orjson.OPT_APPEND_NEWLINE)
        self._lines.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self.out.write(data)
            self.out.flush()
        except (OSError, ValueError):  # stdout closed or gone: the log is best effort
            pass
