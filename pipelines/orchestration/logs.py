"""Log lines on stderr: ``[obsfeed HH:MM:SS] message`` for people, or JSON lines for a scheduler
(``--log-format json``: one object per line with ts, level, logger, msg and any structured fields).

In JSON mode every line written to stderr becomes a JSON object, the stages' own progress lines and library
warnings included, so a log collector never meets a line it cannot parse.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

_FORMAT = {"mode": "text"}


def _record(msg: str, level: str = "info", logger: str = "obsfeed", **fields: Any) -> str:
    return json.dumps({"ts": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "level": level,
                       "logger": logger, "msg": msg, **fields}, default=str)


class JsonLines(io.TextIOBase):
    """A text stream that turns each line written to it into a JSON object on ``target``."""

    def __init__(self, target: TextIO):
        self._target, self._pending = target, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:                               # progress bars stay off: they redraw with \r
        return False

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.replace("\r", "\n").split("\n")
        for line in lines:
            if line.strip():
                self._target.write(line if _is_json(line) else _record(line.strip(), logger="stderr"))
                self._target.write("\n")
        self._target.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self._target.write(_record(self._pending.strip(), logger="stderr") + "\n")
        self._pending = ""
        self._target.flush()


def _is_json(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return _record(record.getMessage(), level=record.levelname.lower(), logger=record.name)


@contextlib.contextmanager
def log_format(mode: str) -> Iterator[None]:
    """Within the block, stderr and the logging handlers write ``mode`` ('text' or 'json'); restored after
    (the CLI runs in-process in tests and notebooks)."""
    if mode not in ("text", "json"):
        raise ValueError(f"log format must be text or json, got {mode!r}")
    saved_mode, saved_stderr = _FORMAT["mode"], sys.stderr
    # Only the handlers that write to stderr are switched (a FileHandler keeps its file and its format).
    handlers = [(h, h.formatter, h.stream) for h in logging.getLogger().handlers
                if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.__stderr__)]
    _FORMAT["mode"] = mode
    if mode == "json" and not isinstance(sys.stderr, JsonLines):
        sys.stderr = JsonLines(sys.stderr)
        for h, _, _ in handlers:
            h.setFormatter(_JsonFormatter())
            h.setStream(sys.stderr)
    try:
        yield
    finally:
        if isinstance(sys.stderr, JsonLines):
            sys.stderr.flush()
        sys.stderr, _FORMAT["mode"] = saved_stderr, saved_mode
        for h, formatter, stream in handlers:
            h.setFormatter(formatter)
            h.setStream(stream)


def log(msg: str, level: str = "info", **fields: Any) -> None:
    """One log line; ``fields`` (e.g. day, stage, status) are structured keys in JSON mode, omitted in text."""
    if _FORMAT["mode"] == "json":
        print(_record(msg, level=level, **fields), file=sys.stderr, flush=True)
    else:
        print(f"[obsfeed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def json_mode() -> bool:
    return _FORMAT["mode"] == "json"
