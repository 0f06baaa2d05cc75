"""Stage entry points (simulate, ingest, fit, score, train, report, evaluate) and the `obsfeed` CLI."""
