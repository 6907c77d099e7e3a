"""Worked examples a user can copy; importable without benchmarks/."""
