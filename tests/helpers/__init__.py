"""Builders shared by the test suites (tiny models, tokenizers)."""
