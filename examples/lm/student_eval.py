"""Train one student of the matrix with mtkd_train's Python API, and score it per domain.

``train_student`` is the :data:`examples.lm.students.Trainer` of the real experiment: the same
``TrainConfig`` and ``DistillRecipe`` that ``mtkd-train`` builds, resumed from the run folder's
newest checkpoint when there is one. ``domain_nll`` scores a saved student on every sample of a
cache and sums the NLL of each next token per domain, with the trainer's row rule (a sample's last
token predicts nothing), so the pooled figure equals ``mtkd-train``'s held-out perplexity.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from examples.lm.students import Recipe, RunSpec

__all__ = ["domain_nll", "read_curve", "summarize_domains", "train_student"]


@torch.no_grad()
def domain_nll(student_dir: Path, cache: str) -> dict[str, dict[str, float]]:
    """Summed next-token NLL (nats) and scored positions of the student in `student_dir`, per domain of `cache`."""
    from transformers import AutoModelForCausalLM

    from mtkd_cache import open_cache

    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    reader = open_cache(cache)
    names = reader.inputs.domains or []
    sums: dict[str, dict[str, float]] = defaultdict(lambda: {"nll": 0.0, "positions": 0})
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c)
        if data.domains is None:
            raise ValueError(f"cache {cache} has no domain column; prepare it with --domain-column")
        if "loss_mask" in data.inputs or "doc_start" in data.inputs or (data.domains < 0).any():
            raise ValueError(f"cache {cache} has packed or loss-masked samples, or samples without a domain; "
                             "domain_nll scores whole unpacked samples of a named domain: prepare it without "
                             "--pack / a response mask, with a domain on every row")
        ids_all = data.inputs["token_ids"]
        for i in range(len(data.sample_ids)):
            o, n = int(data.offsets[i]), int(data.lengths[i])
            if n < 2:
                continue
            ids = torch.as_tensor(ids_all[o:o + n], dtype=torch.long)[None]  # (1, n)
            logits = model(input_ids=ids[:, :-1]).logits.float()  # (1, n - 1, V)
            s = sums[names[int(data.domains[i])]]
            s["nll"] += torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum").item()
            s["positions"] += n - 1
    return dict(sums)


def summarize_domains(sums: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Perplexity per domain, plus ``overall`` (all positions pooled) and ``worst`` (the highest domain)."""
    out = {d: {"perplexity": math.exp(s["nll"] / s["positions"]), "nll": s["nll"] / s["positions"],
               "positions": s["positions"]} for d, s in sorted(sums.items())}
    nll, pos = sum(s["nll"] for s in sums.values()), sum(s["positions"] for s in sums.values())
    worst = max(out, key=lambda d: out[d]["perplexity"])
    out["overall"] = {"perplexity": math.exp(nll / pos), "nll": nll / pos, "positions": pos}
    out["worst"] = {"perplexity": out[worst]["perplexity"], "domain": worst}  # type: ignore[dict-item]
    return out


def read_curve(metrics: Path) -> list[dict[str, float]]:
    """The held-out evaluations a run logged in ``metrics.jsonl``: step, perplexity, nll."""
    curve = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        rec = json.loads(line)
        if "eval" in rec:
            s = rec["eval"]["student"]
            curve.append({"step": rec["step"], "perplexity": s["perplexity"], "nll": s["nll"]})
    return sorted({c["step"]: c for c in curve}.values(), key=lambda c: c["step"])  # a resumed run may repeat one


def train_student(spec: RunSpec, seed: int, recipe: Recipe, out: Path, *, cache: str, curve_cache: str,
                  eval_cache: str, student: Path) -> dict[str, Any]:
    """Train (spec, seed) into `out` (resuming its newest checkpoint), then score it per domain on `eval_cache`."""
    from mtkd_train.checkpoint import latest_checkpoint
    from mtkd_train.config import TrainConfig
    from mtkd_train.recipe import DistillRecipe

    cfg = TrainConfig(cache=cache, teachers=spec.teachers, student=str(student), out=str(out),
                      aggregate=spec.aggregate, aggregate_kwargs=dict(spec.aggregate_kwargs),
                      alpha=recipe.alpha if spec.kd else 0.0, temperature=recipe.temperature,
                      batch_size=recipe.batch_size, max_steps=recipe.steps, lr=recipe.lr,
                      warmup_steps=max(1, recipe.steps // 20), seed=seed, shuffle_chunks=64,
                      eval_cache=curve_cache, eval_every=recipe.eval_every, checkpoint_every=recipe.eval_every,
                      keep_checkpoints=1, num_workers=1, progress=False, log_every=5)
    resume = latest_checkpoint(out / "checkpoints") is not None
    t0 = time.perf_counter()
    recipe_ = DistillRecipe(cfg).setup(resume=resume)
    try:
        recipe_.train()
        if recipe_.stopped:
            raise KeyboardInterrupt(f"stopped by SIGTERM at step {recipe_.step}; run the same command to resume")
        path = recipe_.save()
    finally:
        recipe_.close()
    seconds = _add_seconds(out / "train_seconds.json", time.perf_counter() - t0, resumed=resume)
    assert path is not None  # rank 0: one process here
    return {"domains": summarize_domains(domain_nll(path, eval_cache)), "curve": read_curve(out / "metrics.jsonl"),
            "aggregate": recipe_.aggregate, "aggregate_kwargs": recipe_.aggregate_kwargs,
            "train_seconds": seconds, "resumed": resume,
            "positions_per_s": _rate(out / "metrics.jsonl")}


def _add_seconds(path: Path, seconds: float, *, resumed: bool) -> float:
    """This stretch's seconds, plus those the run folder recorded before when the run resumed; the total."""
    total = seconds + (json.loads(path.read_text())["seconds"] if resumed and path.is_file() else 0.0)
    path.write_text(json.dumps({"seconds": total}))
    return total


def _rate(metrics: Path) -> float | None:
    if not metrics.is_file():
        return None
    rates = [json.loads(line).get("positions_per_s") for line in metrics.read_text().splitlines()]
    rates = [r for r in rates if r is not None]
    return rates[-1] if rates else None
