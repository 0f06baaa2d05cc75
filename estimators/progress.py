"""Progress bars for the long loops (training epochs, encoding a cache): drawn for a person at a terminal only.

A bar redraws one line with ``\\r``; in a file, a pipe, a test's captured stderr or a JSON log it would only be
noise, so it is off unless stderr is a terminal. It also follows logging: a bar is INFO-level news, drawn only while
this module's logger is enabled for INFO (the CLI turns it off in JSON mode, where every stderr line must be a
JSON object, and a program that has not configured logging sees neither obsfeed's INFO lines nor its bars).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
logger = logging.getLogger(__name__)


def bars_shown() -> bool:
    """Whether a progress bar would be drawn now."""
    return sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)


def progress_bar(iterable_or_total: Iterable[T] | int | None = None, *, desc: str = "", unit: str = "it",
                 enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, over an iterable or counting to a total (``None``: a counter), erased when done;
    silent (but still iterable and ``update``-able) when ``enabled`` is false or ``bars_shown()`` is not."""
    iterable, total = (None, iterable_or_total) if iterable_or_total is None or isinstance(iterable_or_total, int) \
        else (iterable_or_total, None)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                disable=not (enabled and bars_shown()), **kwargs)
