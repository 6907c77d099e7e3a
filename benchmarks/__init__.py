"""Benchmarks for mtkd: not installed with the package; run from the repository root."""
