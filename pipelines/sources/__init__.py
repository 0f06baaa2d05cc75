"""Where raw logs come from: the built-in simulator and the importers of public datasets (Coat, HH-RLHF), each
writing the input contract (impression Parquet files and a signal JSON-lines file) that ingest reads."""

import os
from pathlib import Path

DATA_ENV = "OBSFEED_DATA"
"""The one setting that says where the public datasets are (docs/data.md): a folder holding ``coat/`` and
``hh-rlhf/``. A relative path is relative to the working directory."""
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "public"
"""Where they are looked for when ``OBSFEED_DATA`` is unset or empty: ``data/public`` in the repository
(git-ignored)."""


def public_data(name: str) -> Path:
    """The folder of public dataset ``name`` (``coat``, ``hh-rlhf``): ``$OBSFEED_DATA/<name>``, else
    ``data/public/<name>`` in the repository. Not checked here: the real-data tests skip when it is missing
    (naming this setting), and an importer given a missing folder fails naming the file it looked for.

    >>> public_data("coat").name
    'coat'
    """
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA) / name
