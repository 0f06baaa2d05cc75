"""``[output]``: how the datasets are written (partitioning, compression, row groups)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.config.base import Section


class OutputConfig(Section):
    partition_by: Literal["none", "date"] = Field(
        "none", description="'date' writes the pointwise and pairwise datasets as date=YYYY-MM-DD/part-*.parquet "
        "(UTC date of ts; hive style, so polars, pyarrow.dataset, DuckDB and Spark can prune on it)")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    row_group_size: int = Field(131_072, ge=1024)
