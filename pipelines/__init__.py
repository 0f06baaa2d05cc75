"""The stages, one module each (ingest, fit, score, train, report, and evaluate on a finished run): each an
``execute(run, cfg, beam_args)`` that reads and writes only the run directory and returns its typed result
(``schemas/stages.py``). Where raw logs come from is ``pipelines.sources``; what runs the stages (the CLI, the
registry, scheduled runs) is ``pipelines.orchestration``, on top of them."""

import logging


class _ImportNotices(logging.Filter):
    """Beam warns on the root logger, while it is imported, that BigQuery's client is missing (obsfeed never
    uses it): a notice no obsfeed user can act on, dropped here. Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("apitools not found")


logging.getLogger().addFilter(_ImportNotices())
