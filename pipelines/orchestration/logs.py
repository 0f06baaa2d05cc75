"""Where obsfeed's log records go: one handler on stderr, set up by the CLI for the length of a command.

Modules only log (``logging.getLogger(__name__)``, structured fields as ``extra={"event": ..., "day": ...}``) and
configure nothing, so a caller that embeds the stages keeps its own logging. ``configure_logging`` is the one
place that decides the output: ``[obsfeed HH:MM:SS] message`` lines for people (``TextFormatter``), or one JSON
object per line for a scheduler (``JsonFormatter``: ts, level, logger, msg and the record's fields). Every stderr
line in JSON mode is then a JSON object: obsfeed's records, the libraries' records and Python warnings (captured
into the ``py.warnings`` logger) all pass through the same handler, and progress bars
(``estimators.progress``) are off. What bypasses logging and writes to the stderr file itself (a native
library's message, torchrun's launcher) is not converted: obsfeed itself writes nothing that way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from estimators import progress

OWN = ("pipelines", "transforms", "estimators", "schemas")
"""obsfeed's top-level packages: their loggers speak at INFO; every other library's only with ``--verbose``."""
FORMATS = ("text", "json")

_RECORD_ATTRIBUTES = {*vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)), "message", "asctime"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of ``record``: what the call passed as ``extra``."""
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")}


def _ours(record: logging.LogRecord) -> bool:
    return record.name.partition(".")[0] in OWN


class TextFormatter(logging.Formatter):
    """obsfeed's records as ``[obsfeed HH:MM:SS] message``; the CLI's last word (a record with ``exit_code``) as
    ``obsfeed COMMAND: message``, under its traceback if it has one; other libraries' records as their message."""

    def format(self, record: logging.LogRecord) -> str:
        if not _ours(record):
            return super().format(record)
        text = record.getMessage()
        if hasattr(record, "exit_code"):
            line = f"obsfeed {getattr(record, 'command', 'obsfeed')}: {text}"
            trace = getattr(record, "traceback", None)
            return f"{trace.rstrip()}\n{line}" if trace else line
        line = f"[obsfeed {time.strftime('%H:%M:%S', time.localtime(record.created))}] {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC), level, logger, msg, then the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage().strip(),              # an indent is for the eye, not for a collector
               **fields(record)}
        if record.exc_info and "traceback" not in out:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Stderr(logging.StreamHandler):
    """A handler on ``sys.stderr`` as it is when a record is emitted, not when the handler was made (pytest's
    capsys, or a caller, may swap it in between)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


def _writes_stderr(handler: logging.Handler) -> bool:
    return isinstance(handler, _Stderr) or (type(handler) is logging.StreamHandler
                                             and handler.stream in (sys.stderr, sys.__stderr__))


@contextlib.contextmanager
def configure_logging(fmt: str = "text", *, verbose: bool = False) -> Iterator[logging.Handler]:
    """Within the block, log records reach stderr as ``fmt`` ('text' or 'json'): obsfeed's at INFO, the
    libraries' and Python warnings only if ``verbose`` (as warnings; errors always). Everything is restored after
    (the CLI runs in-process in tests and notebooks). Handlers that already wrote to stderr step aside meanwhile,
    so each record is one line; a FileHandler keeps its file and its format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be text or json, got {fmt!r}")
    root = logging.getLogger()
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    displaced = [h for h in root.handlers if _writes_stderr(h)]
    names = ("", *OWN, progress.logger.name)
    levels = {name: logging.getLogger(name).level for name in names}
    capturing = getattr(warnings.showwarning, "__module__", None) == "logging"   # already, by a caller
    for h in displaced:
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbose else logging.ERROR)
    for name in OWN:
        logging.getLogger(name).setLevel(logging.INFO)
    progress.logger.setLevel(logging.WARNING if fmt == "json" else logging.NOTSET)   # a bar is not a JSON record
    logging.captureWarnings(True)                 # warnings.warn → the "py.warnings" logger: shown only if verbose
    try:
        yield handler
    finally:
        if not capturing:
            logging.captureWarnings(False)
        root.removeHandler(handler)
        for h in displaced:
            root.addHandler(h)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
