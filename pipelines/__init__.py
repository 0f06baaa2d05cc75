"""Stage entry points (simulate, ingest, fit, score, train, report, evaluate) and the `obsfeed` CLI."""

import logging

# Libraries log notices while they are imported (Beam: "apitools not found ..."). Until the CLI has set up
# logging (`pipelines.cli.main`: third-party messages only with --verbose), they go nowhere instead of to
# Python's last-resort handler on stderr.
if not logging.getLogger().handlers:
    logging.getLogger().addHandler(logging.NullHandler())
