"""Running the stages: the `obsfeed` CLI, the stage registry, scheduled (daily) runs, the root lock, the
catalogue of days, the run summary and the log formatters. Built on the stages; no stage imports from here."""
