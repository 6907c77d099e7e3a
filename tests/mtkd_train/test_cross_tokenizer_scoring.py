"""Cross-tokenizer teachers beyond top-k training: sampled targets, teacher NLL (`--eval-cache`) and
operator scoring (`--aggregate auto`, `mtkd-score`), all on the aligned, vocabulary-mapped targets.

Known answers: a teacher forced through its own tokenization with the inputs' tokenizer must score
exactly like the same teacher on the inputs' rows (every row aligned); a teacher with another
tokenizer is checked against a per-row reference written from docs/CROSS_TOKENIZER.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mtkd_cache import RunConfig, open_cache, run_teacher
from mtkd_cache.align import project_samples
from mtkd_cache.format.tokenization import TokenizationReader
from mtkd_train.data import CachedDistillDataset
from mtkd_train.evaluate import evaluate_teachers
from mtkd_train.scoring import collect_heldout, score_cache
from tests.mtkd_train._train_target import step_losses
from tests.mtkd_train.test_cross_tokenizer import prepared_pair


@dataclass(frozen=True)
class Caches:
    cache: Path
    student: Path


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Caches:
    root = tmp_path_factory.mktemp("xscore")
    _, student, same, other = prepared_pair(root, 2)
    for name, model, kw, own in (("same", same, {"top_k": 6}, False), ("same_own", same, {"top_k": 6}, True),
                                 ("other", other, {"top_k": 6}, None), ("same_s", same, {"samples": 16}, False),
                                 ("same_s_own", same, {"samples": 16}, True), ("other_s", other, {"samples": 16}, None)):
        run_teacher(root / "cache", RunConfig(teacher=name, model=str(model), **kw), progress=False,
                    own_tokenization=own)
    return Caches(root / "cache", student)


def test_project_samples_maps_each_draw_and_sends_unmapped_draws_to_the_tail() -> None:
    vmap = np.array([2, 2, -1, 0, 1])  # teacher ids 0 and 1 both start with student id 2; id 2 maps nowhere
    idx = np.array([[0, 1, 2, 3], [4, 4, 4, 4], [0, 0, 0, 0]])
    counts = np.array([[3, 1, 2, 2], [8, 0, 0, 0], [0, 0, 0, 0]])  # 8 draws; the last row is padding
    out_idx, logp, tail = project_samples(idx, counts, vmap)
    p = np.where(np.isfinite(logp), np.exp(logp.astype(np.float64)), 0.0)
    got = [{int(i): round(float(q), 6) for i, q in zip(r, pr) if q > 0} for r, pr in zip(out_idx, p)]
    assert got == [{0: 0.25, 2: 0.5}, {1: 1.0}, {}]
    np.testing.assert_allclose(tail, [0.25, 0.0, 1.0])  # the two draws of id 2 are unmapped: 2/8
    ident = project_samples(idx[:2], counts[:2], np.arange(5))  # identity map: the empirical distribution
    np.testing.assert_allclose(np.exp(ident[1][0]), [3 / 8, 1 / 8, 2 / 8, 2 / 8], rtol=1e-6)


def _batches(cache: Path, teachers: list[str]) -> list[dict]:
    return list(CachedDistillDataset(cache, teachers, batch_size=4, shuffle=False, epochs=1, prefetch=0))


def test_sampled_identity_tokenizer_through_the_cross_path_gives_the_same_counts(caches: Caches) -> None:
    for plain, aligned in zip(_batches(caches.cache, ["same_s"]), _batches(caches.cache, ["same_s_own"]), strict=True):
        a, b = plain["targets"]["same_s"], aligned["targets"]["same_s_own"]
        assert set(b) == {"indices", "counts", "present"} and bool(b["present"][plain["position_mask"]].all())
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["counts"], b["counts"])


def test_sampled_other_tokenizer_rows_are_the_mapped_draws(caches: Caches) -> None:
    reader = open_cache(caches.cache)
    tok = TokenizationReader(reader, reader.teacher("other_s").meta.tokenization or "")
    vmap = tok.vocab_map()
    off, lengths, _ = tok.chunk_layout(0)
    raw = reader.teacher("other_s").read_targets(0, int(off[-1] + lengths[-1]))  # chunk 0 on its own grid
    batch = _batches(caches.cache, ["other_s"])[0]  # samples 0..3 = chunk 0
    t = batch["targets"]["other_s"]
    present = t["present"] & batch["position_mask"]
    assert 0 < int(present.sum()) < int(batch["position_mask"].sum())
    for b in range(4):  # each aligned student row holds its teacher row's draws, mapped one by one
        s_ends = np.asarray(reader._input_rows("byte_ends", *_rows(reader.sample_columns, b)[:2], "token"))
        t_ends = tok.rows("byte_ends", *_rows(tok.sample_columns, b)[:2])
        t_first = _rows(tok.sample_columns, b)[0]
        for j in np.flatnonzero(present[b].numpy()):
            r = t_first + [k for k in range(len(t_ends)) if t_ends[k] == s_ends[j]][
                int((s_ends[:j] == s_ends[j]).sum())]
            want: dict[int, float] = {}
            for i, c in zip(raw.indices[r], raw.counts[r]):
                if c and vmap[i] >= 0:
                    want[int(vmap[i])] = want.get(int(vmap[i]), 0.0) + c / 16
            got = {int(i): float(lp.exp()) for i, lp in zip(t["indices"][b, j], t["logp"][b, j]) if lp > -math.inf}
            assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-5 for k in want)
            assert abs(float(t["tail"][b, j]) - (1 - sum(want.values()))) < 1e-5


def _rows(cols: dict, sample: int) -> tuple[int, int, int]:
    o, n = int(cols["offset"][sample]), int(cols["num_positions"][sample])
    return o, o + n, n


def test_a_sampled_teacher_on_another_tokenizer_trains(caches: Caches, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mtkd_train.cli import main

    args = [str(caches.cache), "--teachers", "same,other_s", "--student", str(caches.student), "--out",
            str(tmp_path / "run"), "--aggregate", "mean", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3",
            "--no-progress", "--min-alignment", "0.3"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 3 and all(np.isfinite(v) for v in losses.values())


def test_teacher_nll_through_the_identity_cross_path_equals_the_plain_one(caches: Caches) -> None:
    reader = open_cache(caches.cache)
    got = evaluate_teachers(reader, ["same", "same_own", "same_s_own"])
    assert got["same_own"]["aligned"] == 1.0 and got["same_own"]["positions"] > 50
    for key in ("nll", "accuracy", "perplexity", "ece"):
        assert got["same_own"][key] == pytest.approx(got["same"][key], rel=1e-6), key
    assert got["same_s_own"]["nll"] is None  # sampled counts are not a likelihood, as on the inputs' grid


def _reference_nll(reader, name: str) -> tuple[float, int, int]:  # noqa: ANN001
    """Mean NLL of the student's next tokens at the aligned rows, one row at a time (docs/CROSS_TOKENIZER.md)."""
    tok = TokenizationReader(reader, reader.teacher(name).meta.tokenization or "")
    vmap, vocab = tok.vocab_map(), reader.inputs.tokenizer.vocab_size
    nlls, rows = [], 0
    for s in range(reader.inputs.num_samples):
        so, se, sn = _rows(reader.sample_columns, s)
        to, te, _ = _rows(tok.sample_columns, s)
        s_ends = np.asarray(reader._input_rows("byte_ends", so, se, "token"))
        ids = np.asarray(reader._input_rows("token_ids", so, se, "token"))
        t_ends = tok.rows("byte_ends", to, te)
        block = reader.teacher(name).read_targets(to, te)
        for j in range(sn - 1):
            rows += 1
            same_end = [k for k in range(len(t_ends)) if t_ends[k] == s_ends[j]]
            rank = int((s_ends[:j] == s_ends[j]).sum())
            if rank >= len(same_end):
                continue
            k = same_end[rank]
            probs: dict[int, float] = {}
            for i, lp in zip(block.indices[k], block.logp[k].astype(np.float64)):
                if np.isfinite(lp) and vmap[i] >= 0:
                    probs[int(vmap[i])] = probs.get(int(vmap[i]), 0.0) + math.exp(lp)
            unmapped = sum(math.exp(lp) for i, lp in zip(block.indices[k], block.logp[k]) if vmap[i] < 0)
            tail = float(block.tail[k]) + unmapped
            kept = sum(probs.values())
            y = int(ids[j + 1])
            p = probs[y] * (1 - tail) / kept if y in probs else tail / (vocab - block.indices.shape[1])
            nlls.append(-math.log(max(p, 1e-12)))
    return float(np.mean(nlls)), len(nlls), rows


def test_teacher_nll_of_another_tokenizer_is_scored_on_its_aligned_rows(caches: Caches) -> None:
    reader = open_cache(caches.cache)
    got = evaluate_teachers(reader, ["other"])["other"]
    nll, scored, rows = _reference_nll(reader, "other")
    assert 0.2 < scored / rows < 1.0
    assert got["positions"] == scored and got["aligned"] == pytest.approx(scored / rows)
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_scoring_reads_cross_teachers_at_their_aligned_positions(caches: Caches) -> None:
    reader = open_cache(caches.cache)
    plain, own = collect_heldout(reader, ["same"]), collect_heldout(reader, ["same_own"])
    assert own.aligned == 1.0 and own.num_positions == plain.num_positions
    for a, b in zip(plain.targets[0], own.targets[0]):
        assert torch.equal(a, b)
    both = collect_heldout(reader, ["same", "other"])
    _, scored, rows = _reference_nll(reader, "other")
    assert both.num_positions == scored and both.aligned == pytest.approx(scored / rows)
    assert both.vocab_size == reader.inputs.tokenizer.vocab_size  # type: ignore[union-attr]
    assert int(both.targets[1].indices.max()) < both.vocab_size
    info: dict = {}
    rows_scored, chosen = score_cache(str(caches.cache), ["same", "other"], heldout_info=info)
    assert info == {"positions": scored, "aligned": pytest.approx(scored / rows)}
    alone = {r.note: r.nll for r in rows_scored if r.note.endswith(" alone")}
    assert alone["other alone"] == pytest.approx(_reference_nll(reader, "other")[0], rel=1e-3)
    assert chosen["aggregate"] in {"mean", "loglinear", "entropy", "confidence", "mtbkd", "routing"}


def test_mtkd_score_prints_the_aligned_share(caches: Caches, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mtkd_train.scoring.cli import main as score_main

    res = CliRunner().invoke(score_main, [str(caches.cache), "--teachers", "same,other", "--operators", "mean",
                                          "--out", str(tmp_path / "auto.yaml")])
    assert res.exit_code == 0, res.output
    _, scored, rows = _reference_nll(open_cache(caches.cache), "other")
    assert f"scored {scored} positions, {100 * scored / rows:.1f}% of those read" in res.output


def test_aggregate_auto_chooses_over_a_cross_teacher_and_records_the_aligned_share(caches: Caches,
                                                                                   tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mtkd_train.cli import main

    out = tmp_path / "auto"
    args = [str(caches.cache), "--teachers", "same,other", "--student", str(caches.student), "--out", str(out),
            "--aggregate", "auto", "--batch-size", "4", "--max-steps", "1", "--no-progress", "--min-alignment", "0.3"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "auto_aggregate.json").read_text())
    _, scored, rows = _reference_nll(open_cache(caches.cache), "other")
    assert record["positions"] == scored and record["aligned"] == pytest.approx(scored / rows)
    assert record["chosen"]["aggregate"] in {"mean", "loglinear", "entropy", "confidence", "mtbkd", "routing"}
