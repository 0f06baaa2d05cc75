"""Benchmarks: each prints ratios measured in one run (ours vs a baseline), never a bare absolute time."""
