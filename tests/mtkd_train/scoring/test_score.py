"""Operator scoring on held-out positions: the right answer wins where it is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from mtkd_cache import RunConfig, prepare_arrays, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.scoring import (
    HeldOut,
    rank_operators,
    score_cache,
    score_operator,
    teacher_label_logp,
)
from mtkd_train.scoring._score import golden_section
from mtkd_train.scoring.cli import main as score_main
from mtkd_train.targets import from_dense
from tests.mtkd_train.scoring import _oracle


def _heldout(p: int = 3000, v: int = 10, seed: int = 0, domains: bool = False) -> HeldOut:
    """Teacher 0 is the data distribution, teachers 1 and 2 are other random distributions."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2.0 * torch.randn(3, p, v, generator=g), dim=-1)  # (N, P, V)
    y = torch.multinomial(probs[0], 1, generator=g).squeeze(1)
    targets = tuple(from_dense(probs[i], 4) for i in range(3))  # top-4 of 10 + exact tail
    dom = (torch.arange(p) % 2) if domains else None
    return HeldOut(targets, y, v, dom, ("even", "odd") if domains else (), ("oracle", "r1", "r2"))


def test_the_teacher_that_is_the_data_distribution_wins() -> None:
    data = _heldout()
    rows = rank_operators(data)
    singles = [r for r in rows if r.aggregate == "mean" and sorted(r.kwargs.get("weights", [0])) == [0.0, 0.0, 1.0]]
    best_single = min(singles, key=lambda r: r.nll)
    assert best_single.kwargs["weights"] == [1.0, 0.0, 0.0]
    uniform = next(r for r in rows if r.aggregate == "mean" and not r.kwargs)
    assert best_single.nll < uniform.nll - 0.1
    em_mean = next(r for r in rows if r.aggregate == "mean" and r.kwargs.get("weights") not in
                   ([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], None))
    assert em_mean.kwargs["weights"][0] > 0.9
    assert rows[0].nll <= best_single.nll + 0.01  # nothing auto-chosen is worse than the oracle by much


def test_mean_nll_equals_the_closed_form_mixture_likelihood() -> None:
    data = _heldout(p=500)
    w = [0.5, 0.3, 0.2]
    row = score_operator(data, "mean", {"weights": w})
    lp = teacher_label_logp(data)
    direct = -torch.logsumexp(lp + torch.tensor(w).log(), dim=1).mean()
    assert row.nll == pytest.approx(float(direct), abs=1e-5)
    assert row.mean_weights == pytest.approx(tuple(w), abs=1e-4)


def test_routing_gets_per_domain_em_weights_and_names() -> None:
    data = _heldout(domains=True)
    rows = rank_operators(data, operators=["routing"])
    routing = next(r for r in rows if r.aggregate == "routing")
    table = routing.kwargs["domain_weights"]
    assert set(table) == {0, 1} and all(ws[0] > 0.9 for ws in table.values())


def test_golden_section_finds_the_minimum() -> None:
    x, fx = golden_section(lambda t: (t - 0.7) ** 2 + 1.0, -2.0, 2.0, iters=30)
    assert x == pytest.approx(0.7, abs=1e-4) and fx == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope="module")
def oracle_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    n = 1200
    ctx = rng.integers(0, _oracle.CONTEXTS, size=(n, 1)).astype(np.int64)
    probs = torch.softmax(_oracle.table(0), -1).numpy()
    labels = [int(rng.choice(_oracle.CLASSES, p=probs[c])) for c in ctx[:, 0]]
    cache = tmp_path_factory.mktemp("score") / "cache"
    prepare_arrays(cache, {"input_ids": ctx}, labels=labels, domains=[("lo", "hi")[int(c >= _oracle.CONTEXTS // 2)]
                                                                       for c in ctx[:, 0]], chunk_samples=256)
    spec = f"{_oracle.__name__}:oracle"
    for name, mix in (("exact", 0.0), ("blur", 0.7), ("far", 1.0)):
        run_teacher(cache, RunConfig(teacher=name, model=spec, top_k=3), factory_kwargs={"mix": mix, "seed": 5},
                    progress=False)
    return cache


def test_score_cache_picks_the_exact_teacher_from_a_real_cache(oracle_cache: Path) -> None:
    rows, chosen = score_cache(str(oracle_cache), ["far", "blur", "exact"])
    singles = {r.kwargs["weights"].index(1.0): r.nll for r in rows
               if r.aggregate == "mean" and sorted(r.kwargs.get("weights", [0])) == [0.0, 0.0, 1.0]}
    assert min(singles, key=singles.get) == 2  # "exact"
    w = chosen["aggregate_kwargs"].get("weights") or chosen["aggregate_kwargs"].get("base_weights")
    assert w is not None and w[2] > 0.8


def test_cli_writes_a_config_mtkd_train_reads(oracle_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.yaml"
    res = CliRunner().invoke(score_main, [str(oracle_cache), "--teachers", "exact,far", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "chosen:" in res.output and "label_aware" in res.output
    cfg = yaml.safe_load(out.read_text())
    tc = TrainConfig.from_dict({**cfg, "student": "x", "out": str(tmp_path / "run")})
    assert tc.aggregate == cfg["aggregate"] and list(tc.teachers) == ["exact", "far"]
    as_json = CliRunner().invoke(score_main, [str(oracle_cache), "--teachers", "exact,far", "--json"])
    assert json.loads(as_json.output)[0]["nll"] <= json.loads(as_json.output)[-1]["nll"]


def test_cli_names_a_missing_teacher(oracle_cache: Path) -> None:
    res = CliRunner().invoke(score_main, [str(oracle_cache), "--teachers", "exact,nope"])
    assert res.exit_code != 0 and "nope" in res.output and "Traceback" not in res.output


def test_mtkd_cache_score_is_mtkd_score_and_no_domains_drops_the_per_domain_weights(oracle_cache: Path) -> None:
    from mtkd_cache.cli import main as cache_main

    args = [str(oracle_cache), "--teachers", "exact,far", "--json"]
    direct = json.loads(CliRunner().invoke(score_main, args).output)
    via = CliRunner().invoke(cache_main, ["score", *args])
    assert via.exit_code == 0, via.output
    assert json.loads(via.output) == direct and any(r["aggregate"] == "routing" for r in direct)
    flat = json.loads(CliRunner().invoke(score_main, [*args, "--no-domains"]).output)
    assert not any(r["aggregate"] == "routing" for r in flat) and len(flat) == len(direct) - 1


def test_score_reads_storage_options_from_its_flag_or_the_mtkd_cache_group(monkeypatch: pytest.MonkeyPatch) -> None:
    import mtkd_train.scoring.cli as score_cli
    from mtkd_cache.cli import main as cache_main

    seen: list[object] = []

    def fake(cache: str, teachers: list[str], **kw: object) -> None:
        seen.append(kw["storage_options"])
        raise ValueError("stop here")

    monkeypatch.setattr(score_cli, "score_cache", fake)
    opts = '{"anon": true}'
    for argv, cmd in ((["s3://b/c", "--teachers", "a", "--storage-options", opts], score_main),
                      (["--storage-options", opts, "score", "s3://b/c", "--teachers", "a"], cache_main)):
        res = CliRunner().invoke(cmd, argv)
        assert res.exit_code != 0 and "stop here" in res.output and "Traceback" not in res.output
    assert seen == [{"anon": True}, {"anon": True}]
    res = CliRunner().invoke(score_main, ["s3://b/c", "--teachers", "a", "--storage-options", "[1]"])
    assert res.exit_code != 0 and "JSON object" in res.output
