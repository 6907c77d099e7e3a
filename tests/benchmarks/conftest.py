"""Fixtures shared with the scoring tests: ``oracle_cache`` (a labelled cache with three factory teachers)."""

from tests.mtkd_train.scoring.test_score import oracle_cache  # noqa: F401 - re-exported as a fixture
