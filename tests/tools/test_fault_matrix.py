"""The fault matrix's own machinery: its verdict rules, its damage helpers, its report, and one
real trial run end to end (so `python -m tools.fault_matrix` cannot rot unnoticed)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tests.helpers.tiny_models import build_word_tokenizer
from tools._faults.fixtures import fixtures_at, write_corpus
from tools._faults.ondisk import flip_byte, tree_digest, user_files_lost
from tools._faults.proc import Ctx, Outcome, Trial, judge
from tools._faults.report import summarize, write_json, write_markdown
from tools._faults.writers import _prepare_foreign

REPO = Path(__file__).resolve().parents[2]


def outcome(rc: int, stderr: str = "", timed_out: bool = False) -> Outcome:
    return Outcome(["x"], rc, "", stderr, 1.0, timed_out)


@pytest.mark.parametrize(
    ("out", "kwargs", "verdict"),
    [
        (outcome(0), {"correct": True}, "clean"),
        (outcome(0), {"correct": False}, "silent-wrong"),
        (outcome(0), {"correct": True, "must_fail": True}, "silent-wrong"),
        (outcome(1, "Error: CacheCorruptError: teacher 'a' values chunk 2"), {"correct": False}, "clean"),
        (outcome(1, "Error: bad"), {"correct": True, "may_fail": False}, "wrong-outcome"),
        (outcome(1, "Error: bad thing"), {"correct": False, "names": ["values"]}, "wrong-outcome"),
        (outcome(1, "Traceback (most recent call last):\n  ...\nKeyError: 'values'"), {"correct": False},
         "traceback"),
        (outcome(-9), {"correct": False}, "wrong-outcome"),
        (outcome(0, timed_out=True), {"correct": True}, "hang"),
        (outcome(0), {"correct": True, "lost": ["README.md"]}, "data-loss"),
    ],
)
def test_judge_applies_each_rule(out: Outcome, kwargs: dict, verdict: str) -> None:
    assert judge(out, **kwargs)[0] == verdict


def test_flip_byte_changes_exactly_one_byte(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    original = bytes(range(256)) * 4
    path.write_bytes(original)
    offset, old, new = flip_byte(path, random.Random(1))
    data = path.read_bytes()
    assert old != new and data[offset] == new and original[offset] == old
    assert sum(a != b for a, b in zip(data, original)) == 1


def test_report_replaces_its_own_section_and_keeps_the_baseline(tmp_path: Path) -> None:
    md, js = tmp_path / "R.md", tmp_path / "r.json"
    meta = {"command": "c", "date": "d", "commit": "x", "seconds": 60.0, "jobs": 1, "seed": 0}
    base = [Trial("case A", "silent-wrong", "exit 0; data differs"), Trial("case A", "clean", "ok")]
    write_markdown(md, "# intro", "Baseline before fixes", base, meta)
    write_json(js, "Baseline before fixes", base, meta)
    after = [Trial("case A", "clean", "Error: named")]
    write_markdown(md, "# intro", "After fixes", after, meta)
    write_markdown(md, "# intro", "After fixes", after, meta)  # a re-run replaces, never duplicates
    write_json(js, "After fixes", after, meta)
    text = md.read_text()
    assert text.count("## After fixes") == 1 and text.count("## Baseline before fixes") == 1
    assert "| case A | 2 |" in text and "silent-wrong 1" in text
    assert set(json.loads(js.read_text())) == {"Baseline before fixes", "After fixes"}
    assert summarize(base)["verdicts"]["silent-wrong"] == 1


def test_prepare_into_foreign_folder_trial_judges_what_really_happened(tmp_path: Path) -> None:
    """One real matrix trial (one `mtkd-cache prepare` subprocess): its verdict must match the disk."""
    fx = fixtures_at(tmp_path / "fixtures")
    build_word_tokenizer(32).save_pretrained(fx.teacher_a)
    write_corpus(fx.corpus, 8, seed=0)
    ctx = Ctx(repo=REPO, work=tmp_path, python=sys.executable, timeout=120)
    folder = tmp_path / "trial"
    (trial,) = _prepare_foreign(ctx, fx, folder, overwrite=False)
    proj = folder / "proj"
    survived = all((proj / p).is_file() for p in (".git/HEAD", "README.md", "data/corpus.jsonl"))
    assert trial.verdict in ("clean", "data-loss", "silent-wrong", "traceback")
    assert (trial.verdict == "data-loss") == (not survived), trial.what
    assert user_files_lost(tree_digest(proj), proj) == []
