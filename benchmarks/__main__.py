"""`make bench`: run the benchmarks and print their ratios (``python -m benchmarks [N_IMPRESSIONS]``)."""

from __future__ import annotations

import sys

from benchmarks.bench_ingest import bench_ingest


def main(argv: list[str]) -> int:
    n = int(argv[0]) if argv else 1_000_000
    print(f"ingest benchmark: {n} simulated impressions (Beam, default local runner, vs polars in one process)")
    result = bench_ingest(n)
    for k, v in result.items():
        print(f"  {k:<30} {v:.2f}" if isinstance(v, float) else f"  {k:<30} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
