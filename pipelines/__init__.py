"""Stage entry points (simulate, ingest, fit, score, train, report, evaluate) and the `obsfeed` CLI."""

import logging


class _ImportNotices(logging.Filter):
    """Beam warns on the root logger, while it is imported, that BigQuery's client is missing (obsfeed never
    uses it): a notice no obsfeed user can act on, dropped here. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_ImportNotices())
