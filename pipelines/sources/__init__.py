"""Where raw logs come from: the built-in simulator and the importers of public datasets (Coat, HH-RLHF), each
writing the input contract (impression Parquet files and a signal JSON-lines file) that ingest reads."""
