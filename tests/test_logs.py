"""The CLI's log output: obsfeed's records as ``[obsfeed HH:MM:SS] message`` or JSON objects with their fields,
the libraries' and Python warnings only with --verbose, no progress bar in JSON mode, and logging as it was after."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest

from estimators import progress
from pipelines.orchestration.logs import configure_logging

OURS = logging.getLogger("pipelines.orchestration.registry")
THEIRS = logging.getLogger("some_library")


def test_text_lines(capsys):
    with configure_logging("text"):
        OURS.info("ingest: started", extra={"stage": "ingest", "event": "stage_started"})
        logging.getLogger("pipelines.orchestration.cli").error("bad input", extra={"command": "run", "exit_code": 2})
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(r"\[obsfeed \d\d:\d\d:\d\d\] ingest: started", err[0]), err
    assert err[1] == "obsfeed run: bad input"


def test_an_internal_error_prints_its_traceback_above_the_last_line(capsys):
    with configure_logging("text"):
        logging.getLogger("pipelines.orchestration.cli").error(
            "internal error: ValueError: x", extra={"command": "fit", "exit_code": 1,
                                                    "traceback": "Traceback (most recent call last):\nValueError: x\n"})
    assert capsys.readouterr().err.splitlines() == ["Traceback (most recent call last):", "ValueError: x",
                                                     "obsfeed fit: internal error: ValueError: x"]


def test_json_lines_carry_the_fields(capsys):
    with configure_logging("json", verbose=True):
        OURS.info("  2026-01-02: ok", extra={"day": "2026-01-02", "event": "day_done", "units": 3})
        THEIRS.warning("a library's notice")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert records[0]["msg"] == "2026-01-02: ok" and records[0]["logger"] == OURS.name
    assert {"ts", "level", "logger", "msg", "day", "event", "units"} <= set(records[0])
    assert [r["level"] for r in records] == ["info", "warning", "warning"]
    assert records[2]["logger"] == "py.warnings" and "a library's warning" in records[2]["msg"]


@pytest.mark.parametrize("verbose", [False, True])
def test_libraries_and_warnings_only_when_verbose(capsys, verbose):
    with configure_logging("text", verbose=verbose):
        THEIRS.warning("a library's notice")
        THEIRS.error("a library's error")
        warnings.warn(f"a warning ({verbose})", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "a library's error" in err
    assert ("a library's notice" in err) is verbose and (f"a warning ({verbose})" in err) is verbose


def test_no_progress_bar_in_json_mode(monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    with configure_logging("text"):
        assert progress.bars_shown()
    with configure_logging("json"):
        assert not progress.bars_shown()
        assert progress.progress_bar(10, enabled=True).disable


def test_logging_is_restored_afterwards():
    root = logging.getLogger()
    before = (set(root.handlers), root.level, logging.getLogger("pipelines").level, warnings.showwarning)
    with configure_logging("json", verbose=True):
        with configure_logging("text"):
            pass
        assert len(root.handlers) == len(before[0]) and root.level == logging.WARNING
    assert (set(root.handlers), root.level, logging.getLogger("pipelines").level, warnings.showwarning) == before
