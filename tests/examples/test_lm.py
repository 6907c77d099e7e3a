"""The language-model experiment's data split, scoring and specialist resume (examples/lm)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples.lm.domains import Segment, _spread, segments  # noqa: E402
from examples.lm.perplexity import heldout_bits_per_byte, segment_nll  # noqa: E402
from examples.lm.specialist import SpecialistConfig, train_specialist  # noqa: E402
from tests.helpers.tiny_models import save_tiny_causal_lm  # noqa: E402


def test_segments_pack_whole_paragraphs_and_drop_only_scraps() -> None:
    text = "\n\n".join(f"para {i} " + "x" * 40 for i in range(9)) + "\n\nend"  # paragraphs of 47 chars
    segs = list(segments("d", "src", text, segment_chars=100))
    assert [s.index for s in segs] == [0, 1, 2]
    assert all(len(s.text) >= 100 for s in segs)
    longer = text.replace("\n\nend", "\n\n" + "z" * 30)  # a 30-char tail is >= 100 // 4: kept
    assert list(segments("d", "src", longer, segment_chars=100))[-1].text == "z" * 30
    joined = "\n\n".join(s.text for s in segs)
    assert joined == text[: len(joined)]  # paragraphs kept whole and in order
    assert "end" not in joined  # a 3-character tail is a scrap, not a segment


def test_spread_caps_characters_across_the_whole_split() -> None:
    items = [Segment("d", f"s{i}", 0, "y" * 10) for i in range(100)]
    kept = _spread(items, cap_chars=250)
    assert 24 <= len(kept) <= 26
    assert kept[0].source == "s0" and int(kept[-1].source[1:]) >= 90  # spread over, not the first 25


def test_windowed_nll_equals_one_pass(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny_causal_lm(tmp_path / "lm", vocab_size=64)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = [int(i) for i in torch.randint(4, 56, (23,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        seq = torch.tensor([[2, *ids]])
        logits = model(input_ids=seq[:, :-1]).logits[0]
        one_pass = torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="sum").item()
    assert segment_nll(model, ids, 2, window=64) == pytest.approx(one_pass, rel=1e-5)
    # windows of 5 lose context, so the NLL changes, but every token is still scored once
    windowed = segment_nll(model, ids, 2, window=5)
    assert windowed != pytest.approx(one_pass, rel=1e-6) and math.isfinite(windowed)


def _write_split(data: Path, name: str, texts: list[str]) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_bits_per_byte_counts_every_byte(tmp_path: Path) -> None:
    path = save_tiny_causal_lm(tmp_path / "lm", vocab_size=64)
    _write_split(tmp_path / "data", "d.heldout.jsonl", ["w1 w2 w3", "w4 w5"])
    r = heldout_bits_per_byte(path, tmp_path / "data", "d")
    assert r["bytes"] == len("w1 w2 w3") + len("w4 w5") and r["tokens"] == 5 and r["segments"] == 2
    # a random tiny LM is near-uniform over 64 ids: about ln(64) nats per token
    assert r["token_perplexity"] == pytest.approx(64, rel=0.3)
    assert r["bits_per_byte"] == pytest.approx(math.log2(r["token_perplexity"]) * 5 / r["bytes"], rel=1e-6)


def test_specialist_resumes_to_the_same_weights(tmp_path: Path) -> None:
    base = save_tiny_causal_lm(tmp_path / "base", vocab_size=64)
    _write_split(tmp_path / "data", "d.train.jsonl", [" ".join(f"w{i % 50}" for i in range(k, k + 40)) for k in range(8)])
    cfg = SpecialistConfig("d", block=8, batch=2, warmup=2, save_every=3, epochs=1.0)
    whole = train_specialist(base, tmp_path / "data", tmp_path / "whole", tmp_path / "s1", cfg)
    # the same run, stopped after its first saved state and started again
    cut = SpecialistConfig("d", block=8, batch=2, warmup=2, save_every=3, epochs=1.0)
    from examples.lm import specialist as sp

    calls = {"n": 0}
    real_save = torch.save

    def stop_after_first_save(obj, f):  # type: ignore[no-untyped-def]
        real_save(obj, f)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    sp.torch.save = stop_after_first_save  # type: ignore[attr-defined]
    try:
        with pytest.raises(KeyboardInterrupt):
            train_specialist(base, tmp_path / "data", tmp_path / "resumed", tmp_path / "s2", cut)
    finally:
        sp.torch.save = real_save  # type: ignore[attr-defined]
    resumed = train_specialist(base, tmp_path / "data", tmp_path / "resumed", tmp_path / "s2", cut)
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base_w = load_file(base / "model.safetensors")
    assert any(not torch.equal(a[k], base_w[k]) for k in a)  # it did train
    with pytest.raises(ValueError, match="delete"):
        train_specialist(base, tmp_path / "data", tmp_path / "other", tmp_path / "s2",
                         SpecialistConfig("d", block=8, batch=2, lr=1e-3))


# -- the student matrix (examples/lm/students.py, report.py, student_eval.py) ---------------------

from examples.lm.caches import spread  # noqa: E402
from examples.lm.report import aggregate, goal, last_change, mean_std, ranking_stability, table  # noqa: E402
from examples.lm.student_eval import domain_nll, summarize_domains  # noqa: E402
from examples.lm.students import (  # noqa: E402
    ALL,
    Recipe,
    RunSpec,
    base_runs,
    claim_run,
    curve_runs,
    result_path,
    run_matrix,
    write_result,
)


def test_spread_keeps_the_fraction_evenly() -> None:
    lines = [str(i) for i in range(20)]
    assert spread(lines, 0.25) == ["0", "4", "8", "12", "16"]
    assert spread(lines, 1.0) == lines
    with pytest.raises(ValueError, match="fraction"):
        spread(lines, 0.0)


def _fake_trainer(calls: list[tuple[str, int]], ppl: dict[str, float]):  # type: ignore[no-untyped-def]
    def train(spec: RunSpec, seed: int, recipe: Recipe, out: Path) -> dict[str, object]:
        calls.append((spec.name, seed))
        p = ppl.get(spec.name, 50.0) + seed
        return {"domains": {"a": {"perplexity": p}, "b": {"perplexity": 2 * p}, "overall": {"perplexity": 1.5 * p},
                            "worst": {"perplexity": 2 * p}}, "curve": [], "train_seconds": 1.0}
    return train


def test_run_matrix_skips_finished_runs_and_refuses_another_recipe(tmp_path: Path) -> None:
    recipe = Recipe(steps=10)
    runs = [(s, seed) for seed in (0, 1) for s in base_runs()[:2]]
    calls: list[tuple[str, int]] = []
    first = run_matrix(tmp_path, runs[:3], recipe, _fake_trainer(calls, {}), log=lambda _: None)
    assert calls == [("nokd", 0), ("smollm2", 0), ("nokd", 1)] and len(first) == 3
    calls.clear()
    again = run_matrix(tmp_path, runs, recipe, _fake_trainer(calls, {}), log=lambda _: None)
    assert calls == [("smollm2", 1)]  # only the missing one runs
    assert [r["spec"]["name"] for r in again] == ["nokd", "smollm2", "nokd", "smollm2"]
    stored = json.loads(result_path(tmp_path, runs[0][0], 0).read_text())
    assert stored["recipe"] == recipe.to_dict() and stored["seed"] == 0
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="another recipe"):
        run_matrix(tmp_path, runs[:1], Recipe(steps=20), _fake_trainer(calls, {}), log=lambda _: None)


def test_aggregate_gives_mean_and_sample_std_over_seeds(tmp_path: Path) -> None:
    runs = [(s, seed) for seed in (0, 1, 2) for s in base_runs()[:2]]
    results = run_matrix(tmp_path, runs, Recipe(), _fake_trainer([], {"nokd": 30.0, "smollm2": 20.0}),
                         log=lambda _: None)
    rows = aggregate(results)
    assert rows["smollm2"]["a"] == {"mean": 21.0, "std": pytest.approx(1.0), "n": 3}  # 20, 21, 22
    assert rows["nokd"]["overall"]["mean"] == pytest.approx(1.5 * 31.0)
    assert rows["nokd"]["seeds"] == [0, 1, 2]
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    md = table(rows, ["a", "b"]).splitlines()
    assert md[2].startswith("| smollm2 | smollm2 | 3 | 21.00 ± 1.00") and md[3].startswith("| nokd | — |")
    mixed = [*results, {**results[0], "recipe": Recipe(steps=7).to_dict()}]
    with pytest.raises(ValueError, match="different recipes"):
        aggregate(mixed)


def test_curve_runs_add_the_best_order_prefixes_once() -> None:
    fixed = {s.name for s in curve_runs({})}
    assert fixed == {"mean-smollm2+gemma3", "mean-all"}
    best = curve_runs({"smollm2-shakespeare": 10.0, "gemma3": 12.0, "smollm2": 11.0})
    assert [s.name for s in best] == ["mean-smollm2+gemma3", "mean-all", "mean-smollm2+specialist"]
    assert best[2].teachers == ("smollm2", "smollm2-shakespeare") and set(best[1].teachers) == set(ALL)


def test_summarize_domains_pools_positions_and_names_the_worst() -> None:
    s = summarize_domains({"a": {"nll": 10.0, "positions": 10}, "b": {"nll": 60.0, "positions": 20}})
    assert s["a"]["perplexity"] == pytest.approx(math.e) and s["b"]["perplexity"] == pytest.approx(math.e ** 3)
    assert s["overall"]["nll"] == pytest.approx(70 / 30) and s["worst"]["domain"] == "b"


def test_domain_nll_pools_to_the_trainers_held_out_perplexity(tmp_path: Path) -> None:
    from mtkd_cache import open_cache, prepare
    from mtkd_train.evaluate import evaluate_student
    from mtkd_train.student import load_student

    lm = save_tiny_causal_lm(tmp_path / "lm", vocab_size=64)
    rows = [{"text": " ".join(f"w{(i * k) % 50}" for i in range(3 + k)), "domain": "ab"[k % 2]} for k in range(9)]
    _write_split(tmp_path, "d.jsonl", [])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare(str(tmp_path / "c"), str(tmp_path / "d.jsonl"), tokenizer=str(lm), max_length=8, domain_column="domain")
    sums = domain_nll(lm, str(tmp_path / "c"))
    assert set(sums) == {"a", "b"}
    pooled = summarize_domains(sums)["overall"]
    ref = evaluate_student(load_student(str(lm), {}, seed=0), open_cache(str(tmp_path / "c")), batch_size=4)
    assert pooled["positions"] == ref["positions"]
    assert pooled["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)


def test_a_failing_run_is_reported_and_retried_later(tmp_path: Path) -> None:
    specs = base_runs()[:3]
    calls: list[tuple[str, int]] = []
    ok = _fake_trainer(calls, {})

    def flaky(spec: RunSpec, seed: int, recipe: Recipe, out: Path) -> dict[str, object]:
        if spec.name == "smollm2":
            raise ValueError("operator refused")
        return ok(spec, seed, recipe, out)

    logs: list[str] = []
    res = run_matrix(tmp_path, [(s, 0) for s in specs], Recipe(), flaky, log=logs.append)
    assert [r["spec"]["name"] for r in res] == ["nokd", "gemma3"]
    assert any(m.startswith("FAILED smollm2 s0: ValueError: operator refused") for m in logs)
    calls.clear()
    run_matrix(tmp_path, [(s, 0) for s in specs], Recipe(), ok, log=lambda _: None)
    assert calls == [("smollm2", 0)]


def test_matrix_runs_seed_0_of_the_base_configs_first(tmp_path: Path) -> None:
    from examples.lm.students_cli import matrix

    runs = matrix(("base", "seeds", "operators", "curve"), [0, 1, 2], tmp_path)
    names = [(s.name, seed) for s, seed in runs]
    base = ["nokd", "smollm2", "gemma3", "specialist", "mean-all", "mean-smollm2+gemma3"]
    assert names[:6] == [(n, 0) for n in base]
    assert names[6:18] == [(n, seed) for seed in (1, 2) for n in base]
    ops = {n for n, _ in names[18:39]}
    assert names[18] == ("auto-all", 0)  # the scored choice first: the question is whether it beats a sweep
    assert ops == {f"{op}-all" for op in ("auto", "loglinear", "entropy", "confidence", "gate", "mtbkd", "routing")}
    assert len(names) == len(set(names))  # no (config, seed) twice: curve prefixes already in base are not re-run


def test_a_run_claimed_by_a_live_process_is_left_to_it_and_a_dead_claim_is_taken_over(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    specs = base_runs()[:2]
    me = f"{socket.gethostname()} {os.getpid()}"
    live = claim_run(tmp_path, specs[0], 0)
    assert live is not None and live.path.read_text() == me
    assert claim_run(tmp_path, specs[0], 0) is None  # its lock is held
    calls: list[tuple[str, int]] = []
    logs: list[str] = []
    run_matrix(tmp_path, [(s, 0) for s in specs], Recipe(), _fake_trainer(calls, {}), log=logs.append)
    assert calls == [("smollm2", 0)] and any(line.startswith("skip nokd s0: another process holds") for line in logs)
    assert live.path.is_file() and not (tmp_path / "runs" / "smollm2-s0.claim").exists()  # released after its run
    os.close(live.fd)  # the holder dies: its lock goes, its file stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live.path.write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    run_matrix(tmp_path, [(s, 0) for s in specs], Recipe(), _fake_trainer(calls, {}), log=lambda _: None)
    assert calls == [("smollm2", 0), ("nokd", 0)] and not live.path.exists()


def test_of_two_takeovers_of_a_dead_claim_one_wins_and_a_locked_or_unlocked_live_claim_is_kept(tmp_path: Path
                                                                                                ) -> None:
    import os
    import socket
    import subprocess

    spec = base_runs()[0]
    path = tmp_path / "runs" / "nokd-s0.claim"
    path.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    first = claim_run(tmp_path, spec, 0)
    assert first is not None and claim_run(tmp_path, spec, 0) is None  # the second taker does not get the lock
    path.write_text(f"{socket.gethostname()} {int(dead.stdout)}")  # a locked file is held, whatever it says
    assert claim_run(tmp_path, spec, 0) is None
    first.release()
    assert not path.exists()
    path.write_text(f"{socket.gethostname()} {os.getpid()}")  # a live holder that does not lock (older code)
    assert claim_run(tmp_path, spec, 0) is None and path.read_text().endswith(str(os.getpid()))


def test_a_run_finished_while_it_was_being_claimed_is_not_run_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import examples.lm.students as students_mod

    spec, calls = base_runs()[1], []
    real = students_mod.claim_run

    def claim_after_another_lane_finished(root: Path, s: RunSpec, seed: int):  # type: ignore[no-untyped-def]
        write_result(root, s, seed, {"spec": s.to_dict(), "seed": seed, "recipe": Recipe().to_dict(), "x": 1})
        return real(root, s, seed)

    monkeypatch.setattr(students_mod, "claim_run", claim_after_another_lane_finished)
    out = run_matrix(tmp_path, [(spec, 0)], Recipe(), _fake_trainer(calls, {}), log=lambda _: None)
    assert calls == [] and out[0]["x"] == 1 and not (tmp_path / "runs" / "smollm2-s0.claim").exists()


def test_the_result_is_written_before_the_claim_is_released(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import examples.lm.students as students_mod

    spec, claim = base_runs()[1], tmp_path / "runs" / "smollm2-s0.claim"
    seen = []
    real = students_mod.write_result

    def write(root: Path, s: RunSpec, seed: int, result: dict[str, object]) -> Path:
        seen.append(claim.is_file())  # still held while the result is written
        return real(root, s, seed, result)

    monkeypatch.setattr(students_mod, "write_result", write)
    run_matrix(tmp_path, [(spec, 0)], Recipe(), _fake_trainer([], {}), log=lambda _: None)
    assert seen == [True] and result_path(tmp_path, spec, 0).is_file() and not claim.exists()


def test_goal_compares_the_best_multi_teacher_student_with_the_best_single_one(tmp_path: Path) -> None:
    specs = {s.name: s for s in base_runs()}
    ppl = {"nokd": 40.0, "smollm2": 20.0, "gemma3": 25.0, "mean-all": 16.0, "mean-smollm2+gemma3": 19.5}
    runs = [(specs[n], seed) for seed in (0, 1, 2) for n in ppl]
    results = run_matrix(tmp_path, runs, Recipe(), _fake_trainer([], ppl), log=lambda _: None)
    assert goal(aggregate(results[:1]), results[:1]) is None  # no KD result yet: nothing to compare
    g = goal(aggregate(results), results)
    assert g is not None and (g["best_single"], g["best_multi"]) == ("smollm2", "mean-all")
    assert g["margin"] == pytest.approx(1.5 * 4.0) and g["two_std"] == pytest.approx(2 * 1.5)  # seed adds 0, 1, 2
    assert g["paired_margin_by_seed"] == {0: pytest.approx(6.0), 1: pytest.approx(6.0), 2: pytest.approx(6.0)}
    assert g["met"]
    close = run_matrix(tmp_path / "close", [(specs[n], seed) for seed in (0, 1, 2) for n in ("smollm2", "mean-all")],
                       Recipe(), _fake_trainer([], {"smollm2": 20.0, "mean-all": 19.0}), log=lambda _: None)
    g = goal(aggregate(close), close)
    assert g is not None and g["margin"] == pytest.approx(1.5) and not g["met"]  # 1.5 < 2 std = 3


# -- does scoring the target predict the student? (examples/lm/predict.py) -------------------------

from examples.lm.predict import stored_targets, student_points, target_config, target_points  # noqa: E402


def test_target_config_reads_the_choice_auto_logged(tmp_path: Path) -> None:
    assert target_config(RunSpec("entropy-all", ALL, "entropy"), tmp_path) == ("entropy", {})
    auto = RunSpec("auto-all", ALL, "auto")
    with pytest.raises(FileNotFoundError, match="auto_aggregate.json"):
        target_config(auto, tmp_path)
    chosen = {"aggregate": "mean", "aggregate_kwargs": {"weights": [0.2, 0.3, 0.5]}}
    (tmp_path / "auto_aggregate.json").write_text(json.dumps({"chosen": chosen, "ranked": []}))
    assert target_config(auto, tmp_path) == ("mean", {"weights": [0.2, 0.3, 0.5]})


def test_student_points_leave_out_the_gate_and_no_kd(tmp_path: Path) -> None:
    specs = {s.name: s for s in base_runs()} | {"gate-all": RunSpec("gate-all", ALL, "gate")}
    ppl = {"nokd": 40.0, "smollm2": 20.0, "gate-all": 18.0}
    runs = [(specs[n], seed) for seed in (0, 1) for n in ppl]
    pts = student_points(run_matrix(tmp_path, runs, Recipe(), _fake_trainer([], ppl), log=lambda _: None))
    assert set(pts) == {"smollm2"} and pts["smollm2"]["seeds"] == 2
    # the fake trainer's overall perplexity is 1.5 * (ppl + seed)
    assert pts["smollm2"]["student_nll_s0"] == pytest.approx(math.log(30.0))
    assert pts["smollm2"]["student_nll_mean"] == pytest.approx((math.log(30.0) + math.log(31.5)) / 2)


def test_target_points_score_every_config_on_the_same_positions(tmp_path: Path) -> None:
    from mtkd_cache import RunConfig, open_cache, prepare, run_teacher
    from mtkd_train.scoring import collect_heldout, score_operator

    models = [save_tiny_causal_lm(tmp_path / f"t{s}", vocab_size=40, seed=s) for s in (1, 2)]
    rows = [{"text": " ".join(f"w{(i * k) % 30}" for i in range(4 + k % 5)), "domain": "ab"[k % 2]} for k in range(12)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = str(tmp_path / "c")
    prepare(cache, str(tmp_path / "d.jsonl"), tokenizer=str(models[0]), max_length=12, domain_column="domain",
            progress=False)
    for name, m in zip("ab", models):
        run_teacher(cache, RunConfig(teacher=name, model=str(m), top_k=8), progress=False)
    configs = {"a": (("a",), "mean", {}), "b": (("b",), "mean", {}), "mean-ab": (("a", "b"), "mean", {}),
               "routing-ab": (("a", "b"), "routing", {"domain_to_teacher": {"a": "b", "b": "a"}})}
    pts, info = target_points(cache, configs, teachers=("a", "b"))
    alone = score_operator(collect_heldout(open_cache(cache), ("a",)), "mean", {})
    assert info["positions"] > 0 and pts["a"]["nll"] == pytest.approx(alone.nll, rel=1e-6)
    assert pts["mean-ab"]["nll"] < (pts["a"]["nll"] + pts["b"]["nll"]) / 2  # -log is convex: the mixture wins
    assert pts["routing-ab"]["nll"] != pytest.approx(pts["mean-ab"]["nll"])
    assert min(pts["a"]["nll"], pts["b"]["nll"]) <= pts["routing-ab"]["nll"] <= max(pts["a"]["nll"], pts["b"]["nll"])


def test_stored_targets_are_reused_only_for_the_same_target(tmp_path: Path) -> None:
    point = {"aggregate": "routing", "aggregate_kwargs": {"domain_weights": {"a": [0.25, 0.75]}},
             "teachers": ["a", "b"], "nll": 3.5, "ece": 0.02, "accuracy": 0.4, "student_nll_mean": 5.0, "seeds": 1}
    path = tmp_path / "lm_predict.json"
    path.write_text(json.dumps({"curve_cache": {"positions": 7, "aligned": 1.0}, "points": {"auto-ab": point}}))
    same = {"auto-ab": (("a", "b"), "routing", {"domain_weights": {"a": [0.25, 0.75]}})}
    pts, info = stored_targets(path, same, 100)
    assert info == {"positions": 7, "aligned": 1.0} and pts["auto-ab"]["nll"] == 3.5
    assert "student_nll_mean" not in pts["auto-ab"]  # the students' side is recomputed from the runs
    with pytest.raises(ValueError, match="auto-ab is routing .* not mean"):  # auto chose otherwise: rescore
        stored_targets(path, {"auto-ab": (("a", "b"), "mean", {})}, 100)
    with pytest.raises(ValueError, match="mean-ab is missing.*leave out --targets"):
        stored_targets(path, {"mean-ab": (("a", "b"), "mean", {})}, 100)
    with pytest.raises(ValueError, match="scored 7 positions .* not --max-positions 5; pass the same"):
        stored_targets(path, same, 5)  # fewer positions asked for than were scored
    path.write_text(json.dumps({"curve_cache": {"positions": 7, "max_positions": 80}, "points": {"auto-ab": point}}))
    with pytest.raises(ValueError, match=r"\(--max-positions 80\), not --max-positions 100"):
        stored_targets(path, same, 100)


def test_last_change_measures_how_flat_a_run_ends() -> None:
    curve = [{"step": 30, "perplexity": 200.0}, {"step": 60, "perplexity": 100.0}, {"step": 90, "perplexity": 95.0}]
    assert last_change(curve) == pytest.approx(-0.05) and last_change(curve[:1]) is None
    res = [{"spec": RunSpec("smollm2", ("smollm2",)).to_dict(), "seed": s, "recipe": Recipe().to_dict(),
            "domains": {"overall": {"perplexity": 90.0 + s}, "worst": {"perplexity": 99.0}}, "curve": curve[: 3 - s]}
           for s in (0, 1)]
    rows = aggregate(res)
    assert rows["smollm2"]["last_change"]["mean"] == pytest.approx((-0.05 - 0.5) / 2)
    assert aggregate(res + [{**res[0], "seed": 2, "curve": []}])["smollm2"]["last_change"] is None
    assert table(rows, []).splitlines()[2].endswith("| -27.5% |")


def test_goal_ignores_configs_of_one_seed_and_compares_on_the_single_configs_seeds(tmp_path: Path) -> None:
    specs = {s.name: s for s in base_runs()} | {"auto-all": RunSpec("auto-all", ALL, "auto")}
    runs = [(specs["smollm2"], s) for s in (0, 1, 2)] + [(specs["mean-all"], s) for s in (0, 1, 2, 3)]
    runs += [(specs["auto-all"], 0)]
    ppl = {"smollm2": 400.0, "mean-all": 334.0, "auto-all": 300.0}
    results = run_matrix(tmp_path, runs, Recipe(), _fake_trainer([], ppl), log=lambda _: None)
    g = goal(aggregate(results), results)
    assert g is not None and (g["best_single"], g["best_multi"]) == ("smollm2", "mean-all")  # not the 1-seed auto
    assert g["met"] and sorted(g["paired_margin_by_seed"]) == [0, 1, 2]
    only_one = [r for r in results if r["spec"]["name"] != "mean-all"]
    assert goal(aggregate(only_one), only_one) is None  # no multi-teacher config with 2+ seeds


def test_train_seconds_add_up_over_a_resumed_run(tmp_path: Path) -> None:
    from examples.lm.student_eval import _add_seconds

    assert _add_seconds(tmp_path / "s.json", 10.0, resumed=False) == 10.0
    assert _add_seconds(tmp_path / "s.json", 2.5, resumed=True) == 12.5  # the second stretch, after a resume
    assert _add_seconds(tmp_path / "s.json", 4.0, resumed=False) == 4.0  # a fresh run in the same folder


def test_ranking_stability_finds_when_the_ranking_settles_and_counts_seeds_per_pair() -> None:
    def result(name: str, seed: int, ppl: list[float], final: float) -> dict:
        return {"spec": RunSpec(name, ("smollm2",)).to_dict(), "seed": seed, "recipe": Recipe().to_dict(),
                "domains": {"overall": {"perplexity": final}},
                "curve": [{"step": 10 * (i + 1), "perplexity": p} for i, p in enumerate(ppl)]}

    res = [result("a", 0, [50, 40, 30, 20], 20), result("a", 1, [50, 40, 30, 22], 25),  # curve means 50 40 30 21
           result("b", 0, [45, 42, 35, 25], 21), result("b", 1, [45, 42, 35, 23], 23),  # curve means 45 42 35 24
           result("c", 0, [60, 50, 40, 30], 30)]  # one seed only
    st = ranking_stability(res, ["a", "b"])
    assert st is not None and st["seeds"] == [0, 1]
    assert st["ranking_by_step"]["10"] == ["b", "a"] and st["ranking_by_step"]["40"] == ["a", "b"]
    assert st["stable_since"] == 20 and st["last_step"] == 40
    assert st["final_ranking"] == ["b", "a"] and not st["final_agrees"]  # full held-out set: b 22 < a 22.5
    assert st["pairs_by_seed"] == {"b < a": 1}  # seed 1 only (23 < 25; seed 0: 21 > 20)
    assert ranking_stability(res, ["a"]) is None and ranking_stability(res, ["a", "zzz"]) is None
    with_c = ranking_stability(res, ["a", "b", "c"])
    assert with_c is not None and with_c["seeds"] == [0] and with_c["final_ranking"] == ["a", "b", "c"]
