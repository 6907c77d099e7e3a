"""The two caches of the language-model experiment: a transfer cache and a held-out eval cache.

* ``transfer``: about half of every domain's training split (segments spread evenly over the split,
  about 200k SmolLM2 positions in all), the text the students learn from.
* ``eval``: every domain's whole held-out split (about 24-30k positions per domain), on which the
  students' perplexity and the teachers' aggregated targets are scored.
* ``curve``: a quarter of every held-out split (no teachers): the students' periodic evaluation,
  cheap enough to run every few dozen steps.

Both are prepared with the SmolLM2 tokenizer (the student's) and keep each sample's text and domain
(format 3), so a teacher with another tokenizer (Gemma-3) re-tokenizes the stored text, and every
result can be reported per domain. Each teacher is then cached with ``mtkd-cache run`` at top-k 64.
"""

from __future__ import annotations

import json
from pathlib import Path

from examples.lm.domains import DOMAINS

__all__ = ["CACHE_SPLITS", "TEACHERS", "cache_data", "spread"]

CACHE_SPLITS = {"transfer": ("train", 0.5), "eval": ("heldout", 1.0), "curve": ("heldout", 0.25)}
"""Each cache's split and the fraction of its segments kept (spread evenly over the split)."""
TEACHERS = ("smollm2", "gemma3", "smollm2-shakespeare")


def spread(lines: list[str], fraction: float) -> list[str]:
    """Every line whose index crosses the next multiple of 1/`fraction`: a fraction spread evenly."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction}: must be in (0, 1]")
    kept, budget = [], 0.0
    for i, line in enumerate(lines):
        if i >= budget:
            kept.append(line)
            budget += 1 / fraction
    return kept


def cache_data(data_dir: Path, cache: str) -> Path:
    """Write ``{cache}.jsonl`` (all domains, with a ``domain`` column) under `data_dir`; return its path."""
    split, fraction = CACHE_SPLITS[cache]
    out = data_dir / f"{cache}.jsonl"
    rows: list[str] = []
    for domain in DOMAINS:
        lines = (data_dir / f"{domain}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
        rows += spread(lines, fraction)
    for row in rows:
        json.loads(row)  # every row parses before anything is written
    out.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
    return out
