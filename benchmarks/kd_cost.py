"""KD at the cost of cross-entropy (issue 9): loss time, loss memory, distillation tax.

    python -m benchmarks.kd_cost                  # all three parts, ~10 min on 2 shared cores
    python -m benchmarks.kd_cost --parts a,c      # a subset

(a) **KD+CE / CE, forward + backward.** One objective as the trainer runs it — the `entropy`
    operator's weights, the merged target (union), then ``alpha * KD + (1 - alpha) * CE`` with
    ``alpha = 0.5``, bucket tail, T = 1 — against ``F.cross_entropy`` on the same logits, for
    the fused loss and for the reference (autograd) loss. V = 8,192 / 49,152 with P = 512
    positions, V = 262,144 with P = 128 (the reference path needs ~10 float32 ``(P, V)``
    temporaries, which at P = 512 would be ~5 GB on a machine shared with other jobs). N = 1 and
    4 teachers, k = 64. Two fused arms: ``fused`` merges the teachers inside the timed call (the
    trainer with ``merge_in = step``, or with the gate); ``fused_loss_only`` gets the merged
    target, as the trainer's step does by default (the DataLoader worker merged it:
    `mtkd_train.teacher_side`). ``merge`` times that merge alone (the worker's share).
(b) **Peak memory of the loss / that of cross-entropy.** Each arm runs in a fresh subprocess:
    inputs built, the kernel's RSS high-water mark reset (``5 > /proc/self/clear_refs``), one
    forward + backward, then ``VmHWM - VmRSS`` before it (``/proc/self/status``). Large tensors
    are ``mmap``-ed by glibc, so the RSS follows allocations. The targets are synthetic top-64
    rows (no dense teacher), with the N = 4 `entropy` merge. Plus the LM-head-fused path against the unfused head
    (``h @ W^T`` then CE) and its peak at P = 4,096, V = 262,144 (4.3 GB of float32 logits if
    they were materialised).
(c) **Distillation tax.** Throughput of an mtkd-train step (student forward, `Objective` with
    4 top-64 teachers, entropy operator, bucket, alpha 0.5; backward, clipping, AdamW) / a plain
    hard-label step (HF forward with ``labels``, backward, AdamW), on batches held in memory
    (no loader: the loader is measured in ``train_loader``). Two students: a 2-layer width-64
    Llama at V = 49,152 with 8 x 64 tokens, and the ``train_step`` setting's 2-layer width-128
    Llama at V = 8,192 with 4 x 128 tokens. ``fused_head_loader`` and ``fused_loader`` step on the batch as
    the loader hands it over, merged (``merge_in = loader``, the default on the CPU); the merge is the worker's
    CPU time, stored as ``loader_merge_ms`` per batch. The other arms merge in the step. ``fused_loader`` against
    ``fused_head_loader`` is the choice of ``--loss-impl`` for a trainer that merges in its loader.

Kernels: arms without a suffix run the torch.compile row kernels (``kernels="compiled"``), ``*_eager`` arms
PyTorch's eager kernels, ``*_native`` arms the C++ kernel (``mtkd_train/losses/_native.py``), which is what
``kernels="auto"``, the default, runs for float32 CPU logits since session 16.

Targets are top-64 of teacher distributions ``softmax(4.5 * randn)``-like with a per-teacher scale,
giving top-64 tails and entropies in the range of trained LMs (printed and stored). Clock: process
CPU time with torch on one thread (``--threads``); arms interleaved (A, B, C, A, B, C, ...),
medians over rounds, min-max of the per-round ratios in the JSON.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

import click
import torch
import torch.nn.functional as F

from mtkd_train.aggregate import AggregationContext, build_aggregator
from mtkd_train.losses import (
    combine,
    fused_kd_ce_loss,
    fused_linear_kd_ce_loss,
    hard_label_loss,
    kd_loss,
)
from mtkd_train.targets import SparseTargets, from_dense

RESULTS = Path(__file__).resolve().parent / "results"
K = 64
SCALES = (4.0, 4.5, 5.0, 5.5)  # teacher logit std: top-64 tails of a few percent, entropy 1-3 nats


# -- inputs ----------------------------------------------------------------------------------------
def teachers(p: int, vocab: int, n: int, seed: int) -> list[SparseTargets]:
    """N top-64 targets of random teacher distributions (exact tails), (P, 64) each."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed * 100 + i)
        logits = torch.randn(p, vocab, generator=g).mul_(SCALES[i % len(SCALES)])
        out.append(from_dense(torch.softmax(logits, dim=1), K))
        del logits
    return out


def target_stats(ts: list[SparseTargets]) -> dict[str, float]:
    tails = torch.stack([t.tail for t in ts])
    return {"mean_tail": float(tails.mean()), "min_tail": float(tails.min()), "max_tail": float(tails.max())}


def student_logits(p: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(p, vocab, generator=torch.Generator().manual_seed(seed)).mul_(2.0)


def labels_for(p: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (p,), generator=torch.Generator().manual_seed(7))


# -- the objectives ----------------------------------------------------------------------------------
def merged_target(ts: list[SparseTargets], labels: torch.Tensor, vocab: int) -> SparseTargets:
    agg = build_aggregator("entropy", num_teachers=len(ts), vocab_size=vocab)
    return agg(ts, AggregationContext(labels=labels), vocab_size=vocab, tail_mode="bucket")


def arm_kernels(arm: str) -> tuple[str, str]:
    """``(arm without its kernel suffix, its row kernels)``: an ``*_eager`` arm runs the eager ones, a ``*_native``
    arm the C++ kernel (the CPU default, `losses/_native.py`), the others the torch.compile ones
    (`losses/_kernels.py`)."""
    for kind in ("eager", "native"):
        if arm.endswith(f"_{kind}"):
            return arm.removesuffix(f"_{kind}"), kind
    return arm, "compiled"


def loss_fn(arm: str, ts: list[SparseTargets], labels: torch.Tensor, vocab: int) -> Callable[[torch.Tensor], Any]:
    """The loss of an arm as a function of the logits (aggregation included for KD arms)."""
    if arm == "ce":
        return lambda z: F.cross_entropy(z, labels)
    arm, kernels = arm_kernels(arm)
    if arm == "fused_loss_only":  # the merged target given: the loss alone, without the aggregation
        merged = merged_target(ts, labels, vocab)
        return lambda z: fused_kd_ce_loss(z, merged, labels, alpha=0.5, kernels=kernels).loss
    if arm == "fused":
        return lambda z: fused_kd_ce_loss(z, merged_target(ts, labels, vocab), labels, alpha=0.5, kernels=kernels).loss
    return lambda z: combine(kd_loss(z, merged_target(ts, labels, vocab)), hard_label_loss(z, labels), 0.5)


def _time(fn: Callable[[], Any], faults: list[int] | None = None) -> float:
    """Process CPU seconds of one call; its minor page faults are appended to `faults`."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0 = time.process_time()
    fn()
    took = time.process_time() - c0
    if faults is not None:
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return took


WARM_HEAP = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
"""glibc settings that keep large tensors in the heap between calls (no fresh, page-faulted mmap per
tensor). They must be set before Python starts: ``MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=4294967296 python -m benchmarks.kd_cost ...``."""


def allocator() -> str:
    """Which heap the run had: glibc's default or the warm heap of :data:`WARM_HEAP`."""
    set_ = {k: os.environ[k] for k in WARM_HEAP if k in os.environ}
    return "warm heap (" + ", ".join(f"{k}={v}" for k, v in set_.items()) + ")" if set_ else "glibc default"


FUSED_ARMS = ("fused", "fused_eager", "fused_native", "fused_loss_only", "fused_loss_only_eager",
              "fused_loss_only_native")
"""Fused arms of part (a): with the aggregation or the merged target given; compiled, eager or C++ row kernels."""


def part_a(rounds: int, vocabs: tuple[int, ...] = (8192, 49152, 262144)) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for vocab, p in ((v, p) for v, p in ((8192, 512), (49152, 512), (262144, 128)) if v in vocabs):
        for n in (1, 4):
            ts, labels = teachers(p, vocab, n, seed=1), labels_for(p, vocab)
            z = student_logits(p, vocab, seed=2).requires_grad_(True)
            arms = {a: loss_fn(a, ts, labels, vocab) for a in ("ce", *FUSED_ARMS, "reference")}
            runs = {a: (lambda f=f, z=z: torch.autograd.grad(f(z), z)) for a, f in arms.items()}
            runs["merge"] = lambda ts=ts, labels=labels, vocab=vocab: merged_target(ts, labels, vocab)  # loader work
            for run in runs.values():  # warm-up
                run()
            times: dict[str, list[float]] = {a: [] for a in runs}
            faults: dict[str, list[int]] = {a: [] for a in runs}
            for _ in range(rounds):
                for a, run in runs.items():
                    times[a].append(_time(run, faults[a]))
            key = f"V={vocab},N={n}"
            out[key] = {"P": p, "V": vocab, "N": n, "k": K, "median_ms": {a: 1e3 * median(v) for a, v in times.items()},
                        "median_page_faults": {a: median(v) for a, v in faults.items()}, "allocator": allocator(),
                        **{f"{a}/ce": _ratio(times[a], times["ce"]) for a in (*FUSED_ARMS, "reference", "merge")},
                        "targets": target_stats(ts)}
            click.echo(f"(a) {key} P={p}: " + ", ".join(f"{a}/CE {out[key][f'{a}/ce']['ratio']:.3f}"
                                                       for a in (*FUSED_ARMS, "reference", "merge")))
    return out


def _ratio(num: list[float], den: list[float]) -> dict[str, Any]:
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    return {"ratio": median(num) / median(den), "per_round_min_max": [min(per_round), max(per_round)]}


# -- (b) memory, one arm per fresh process ---------------------------------------------------------------
def _status(field: str) -> int:
    """A `/proc/self/status` memory field (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def sparse_teachers(p: int, vocab: int, n: int) -> list[SparseTargets]:
    """Top-64-shaped targets without a dense (P, V) teacher (memory probes: the set-up stays small)."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(40 + i)
        idx = (torch.randint(0, vocab, (p, 1), generator=g) + torch.arange(K) * (vocab // K)) % vocab  # distinct
        logp = torch.log_softmax(torch.randn(p, K, generator=g) * 2, dim=1) + torch.log(torch.tensor(0.9))
        out.append(SparseTargets(idx, logp, torch.full((p,), 0.1)))
    return out


def memory_probe(arm: str, p: int, vocab: int, n: int, hidden: int) -> dict[str, float]:
    """Peak RSS increase (bytes) of one forward + backward of `arm`, in this (fresh) process.

    The arm first runs once on 8 rows (so the compiled row kernels are built, and imports are done, before
    the measurement); the kernel's high-water mark is reset (`5 > /proc/self/clear_refs`) after the real
    inputs are built, so the peak is the loss's own, not the set-up's.
    """
    torch.set_num_threads(1)
    _probe_run(arm, 8, vocab, n, hidden)()
    run = _probe_run(arm, p, vocab, n, hidden)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    c0 = time.process_time()
    grads = run()
    seconds = time.process_time() - c0
    peak = _status("VmHWM")
    del grads
    return {"peak_delta_bytes": peak - base, "cpu_seconds": seconds}


def _probe_run(arm: str, p: int, vocab: int, n: int, hidden: int) -> Callable[[], Any]:
    """One forward + backward of `arm` on fresh inputs (`*_eager` arms: the eager row kernels)."""
    labels = labels_for(p, vocab)
    target = merged_target(sparse_teachers(p, vocab, n), labels, vocab)
    g = torch.Generator().manual_seed(3)
    arm, kernels = arm_kernels(arm)
    if arm.endswith("head"):
        h = torch.randn(p, hidden, generator=g).requires_grad_(True)
        w = torch.randn(vocab, hidden, generator=g).mul_(0.1).requires_grad_(True)
        if arm == "fused_head":
            return lambda: torch.autograd.grad(
                fused_linear_kd_ce_loss(h, w, target, labels, alpha=0.5, kernels=kernels).loss, (h, w))
        return lambda: torch.autograd.grad(F.cross_entropy(h @ w.T, labels), (h, w))
    z = student_logits(p, vocab, seed=2).requires_grad_(True)
    losses: dict[str, Callable[[], torch.Tensor]] = {
        "ce": lambda: F.cross_entropy(z, labels),
        "fused": lambda: fused_kd_ce_loss(z, target, labels, alpha=0.5, kernels=kernels).loss,
        "reference": lambda: combine(kd_loss(z, target), hard_label_loss(z, labels), 0.5)}
    return lambda: torch.autograd.grad(losses[arm](), z)


def _probe_subprocess(arm: str, p: int, vocab: int, n: int, hidden: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.kd_cost", "--probe", f"{arm},{p},{vocab},{n},{hidden}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_b(repeats: int) -> dict[str, Any]:
    cases = [("ce", 512, 49152, 4, 64), ("fused", 512, 49152, 4, 64), ("fused_eager", 512, 49152, 4, 64),
             ("reference", 512, 49152, 4, 64), ("ce", 512, 8192, 4, 64), ("fused", 512, 8192, 4, 64),
             ("fused_eager", 512, 8192, 4, 64), ("ce_head", 512, 262144, 1, 64), ("fused_head", 512, 262144, 1, 64),
             ("fused_head_eager", 512, 262144, 1, 64), ("fused_head", 4096, 262144, 1, 64)]
    raw: dict[str, list[dict[str, float]]] = {}
    for _ in range(repeats):  # interleaved; each probe a fresh process
        for arm, p, vocab, n, hidden in cases:
            raw.setdefault(f"{arm},P={p},V={vocab},N={n},H={hidden}", []).append(
                _probe_subprocess(arm, p, vocab, n, hidden))
    peak = {k: median([r["peak_delta_bytes"] for r in v]) for k, v in raw.items()}
    mb = {k: v / 2**20 for k, v in peak.items()}

    def ratio(a: str, b: str) -> float:
        return peak[a] / peak[b]

    out = {"method": "fresh subprocess per probe; high-water mark reset (5 > /proc/self/clear_refs) after set-up, "
                     "then VmHWM after one forward + backward minus VmRSS before it (/proc/self/status)",
           "peak_delta_MiB": mb, "raw": raw,
           "fused/ce V=49152": ratio("fused,P=512,V=49152,N=4,H=64", "ce,P=512,V=49152,N=4,H=64"),
           "fused_eager/ce V=49152": ratio("fused_eager,P=512,V=49152,N=4,H=64", "ce,P=512,V=49152,N=4,H=64"),
           "fused_eager/ce V=8192": ratio("fused_eager,P=512,V=8192,N=4,H=64", "ce,P=512,V=8192,N=4,H=64"),
           "fused_head_eager/ce_head V=262144 P=512": ratio("fused_head_eager,P=512,V=262144,N=1,H=64",
                                                             "ce_head,P=512,V=262144,N=1,H=64"),
           "reference/ce V=49152": ratio("reference,P=512,V=49152,N=4,H=64", "ce,P=512,V=49152,N=4,H=64"),
           "fused/ce V=8192": ratio("fused,P=512,V=8192,N=4,H=64", "ce,P=512,V=8192,N=4,H=64"),
           "fused_head/ce_head V=262144 P=512": ratio("fused_head,P=512,V=262144,N=1,H=64",
                                                       "ce_head,P=512,V=262144,N=1,H=64"),
           "logits_MiB_if_materialised P=4096 V=262144": 4096 * 262144 * 4 / 2**20}
    click.echo(f"(b) peak MiB: {json.dumps({k: round(v, 1) for k, v in mb.items()})}")
    return out


# -- (c) distillation tax ------------------------------------------------------------------------------
def _student(vocab: int, width: int, layers: int, intermediate: int, length: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, width // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      max_position_embeddings=length, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _batch(b: int, length: int, vocab: int, n: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, vocab, (b, length), generator=g)
    ts = teachers(b * length, vocab, n, seed=5)
    targets = {f"t{i}": {"indices": t.indices.view(b, length, K), "logp": t.logp.view(b, length, K),
                         "tail": t.tail.view(b, length)} for i, t in enumerate(ts)}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_mask": torch.ones_like(ids, dtype=torch.bool),
            "targets": targets, "_stats": target_stats(ts)}


def _objective(batch: dict[str, Any], arm: str, vocab: int) -> Any:
    from mtkd_train.objective import Objective

    impl, kernels = arm_kernels(arm)
    return Objective(teachers=list(batch["targets"]), capture_temperatures=[1.0] * len(batch["targets"]),
                     vocab_size=vocab, aggregate="entropy", aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket",
                     alpha=0.5, temperature=1.0, loss_impl=impl, kernels=kernels)


def _distill_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any], obj: Any) -> None:
    """What `DistillRecipe` does per step (`_Step.forward`, backward, clip, AdamW) on an in-memory batch."""
    from mtkd_train.student import HeadInputs

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if obj.head_fused:  # the decoder only; the loss applies the head
        out = HeadInputs(model.model(**inputs).last_hidden_state, model.lm_head.weight, None)
        loss = obj(batch, out, None, "causal_lm")["loss"]
    else:
        loss = obj(batch, model(**inputs).logits, None, "causal_lm")["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict[str, Any]) -> None:
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _tax(vocab: int, width: int, layers: int, intermediate: int, b: int, length: int, rounds: int, steps: int,
         arms: tuple[str, ...]) -> dict[str, Any]:
    """A ``*_loader`` arm steps on the batch as the trainer's loader hands it over, its teachers already merged
    (``merge_in = loader``, a DataLoader worker's work: timed apart as ``loader_merge_ms``)."""
    batch = _batch(b, length, vocab, 4)
    models = {a: _student(vocab, width, layers, intermediate, length) for a in ("plain", *arms)}
    opts = {a: torch.optim.AdamW(m.parameters(), lr=3e-4) for a, m in models.items()}
    runs: dict[str, Callable[[], None]] = {"plain": lambda: _plain_step(models["plain"], opts["plain"], batch)}
    objs = {a: _objective(batch, a.removesuffix("_loader"), vocab) for a in arms}
    merge = next((objs[a].loader_transform("causal_lm") for a in arms if a.endswith("_loader")), None)
    merged = batch if merge is None else merge(batch)
    for a in arms:
        runs[a] = lambda a=a: _distill_step(models[a], opts[a], merged if a.endswith("_loader") else batch, objs[a])
    if merge is not None:
        runs["loader_merge"] = lambda: merge(batch)
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {a: [] for a in runs}
    for _ in range(rounds):
        for a, run in runs.items():
            times[a].append(_time(lambda run=run: [run() for _ in range(steps)]) / steps)
    pos = b * length
    out: dict[str, Any] = {"V": vocab, "width": width, "layers": layers, "batch": [b, length], "targets": batch["_stats"],
                           "positions_per_cpu_s": {a: pos / median(t) for a, t in times.items()}}
    if merge is not None:
        out["loader_merge_ms"] = 1e3 * median(times.pop("loader_merge"))
    for a in arms:  # tax = distill throughput / plain throughput = plain time / distill time
        out[f"tax {a}"] = _ratio(times["plain"], times[a])
    click.echo(f"(c) V={vocab} width={width}: " + ", ".join(f"{a} {out[f'tax {a}']['ratio']:.3f}" for a in arms))
    return out


def part_c(rounds: int, steps: int, vocabs: tuple[int, ...] = (8192, 49152)) -> dict[str, Any]:
    arms = ("fused", "fused_loader", "fused_native_loader", "fused_head", "fused_head_loader", "fused_head_eager",
            "fused_head_native_loader", "reference")
    out = {}
    if 49152 in vocabs:
        out["width64_V49152"] = _tax(49152, 64, 2, 256, 8, 64, rounds, steps, arms)
    if 8192 in vocabs:
        out["train_step_setting_V8192"] = _tax(8192, 128, 2, 512, 4, 128, rounds, steps, arms)
    return out


def plot(res: dict[str, Any], path: Path) -> None:
    """Bar charts of (a) KD+CE / CE and (c) the distillation tax, with the targets as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_c) = plt.subplots(1, 2, figsize=(11, 4))
    if "a_time" in res:
        keys = list(res["a_time"])
        for i, (arm, label) in enumerate((("fused", "fused, merged in the step"),
                                          ("fused_loss_only", "fused, merged in the loader"))):
            ax_a.bar([j + 0.4 * i for j in range(len(keys))], [res["a_time"][k][f"{arm}/ce"]["ratio"] for k in keys],
                     width=0.4, label=label)
        ax_a.axhline(1.15, color="k", ls="--", lw=1, label="target 1.15")
        ax_a.set_xticks([j + 0.2 for j in range(len(keys))], [k.replace(",", "\n") for k in keys], fontsize=8)
        ax_a.set_ylabel("time / F.cross_entropy (fwd + bwd)")
        ax_a.set_title("(a) KD+CE / CE")
        ax_a.legend(fontsize=8)
    if "c_tax" in res:
        keys = list(res["c_tax"])
        for i, arm in enumerate(("fused_head_loader", "fused_loader", "fused_head", "fused", "reference")):
            ax_c.bar([j + 0.16 * i for j in range(len(keys))],
                     [res["c_tax"][k].get(f"tax {arm}", {"ratio": 0.0})["ratio"] for k in keys], width=0.16, label=arm)
        ax_c.axhline(0.85, color="k", ls="--", lw=1)
        ax_c.axhline(0.9, color="k", ls=":", lw=1)
        ax_c.set_xticks([j + 0.32 for j in range(len(keys))], keys, fontsize=8)
        ax_c.set_ylabel("distilling / plain throughput")
        ax_c.set_title("(c) distillation tax (targets 0.85 / 0.9)")
        ax_c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command()
@click.option("--parts", default="a,b,c", show_default=True, help="Which parts to run: a (time), b (memory), c (tax).")
@click.option("--rounds", type=int, default=7, show_default=True, help="Interleaved rounds per part-(a)/(c) setting.")
@click.option("--steps", type=int, default=3, show_default=True, help="Training steps per part-(c) block.")
@click.option("--memory-repeats", type=int, default=2, show_default=True, help="Fresh-process probes per (b) arm.")
@click.option("--vocabs", default="8192,49152,262144", show_default=True,
              help="Vocabulary sizes of (a) and (c) to run (results of the others are kept).")
@click.option("--threads", type=int, default=1, show_default=True, help="torch intra-op threads.")
@click.option("--probe", default=None, hidden=True, help="Internal: arm,P,V,N,H of one (b) memory probe.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS / "kd_cost.json", show_default=True,
              help="JSON results file (parts not run keep their previous results).")
def main(parts: str, rounds: int, steps: int, memory_repeats: int, vocabs: str, threads: int, probe: str | None,
         out: Path) -> None:
    """Fused KD+CE vs cross-entropy: time, peak memory and distillation tax."""
    torch.set_num_threads(threads)
    if probe is not None:
        arm, p, vocab, n, hidden = probe.split(",")
        click.echo(json.dumps(memory_probe(arm, int(p), int(vocab), int(n), int(hidden))))
        return
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    res.update({"benchmark": "kd_cost", "torch_threads": torch.get_num_threads(), "clock": "process CPU time",
                "allocator": allocator(),
                "command": "python -m benchmarks.kd_cost " + " ".join(sys.argv[1:])})
    with open("/proc/loadavg") as f:
        res["load_average_before"] = f.read().split()[:3]
    t0 = time.perf_counter()
    chosen = parts.split(",")
    if "a" in chosen:
        res.setdefault("a_time", {}).update(part_a(rounds, tuple(int(v) for v in vocabs.split(","))))
    if "b" in chosen:
        res["b_memory"] = part_b(memory_repeats)
    if "c" in chosen:
        res.setdefault("c_tax", {}).update(part_c(rounds, steps, tuple(int(v) for v in vocabs.split(","))))
    res["wall_seconds_last_run"] = round(time.perf_counter() - t0, 1)
    with open("/proc/loadavg") as f:
        res["load_average_after"] = f.read().split()[:3]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    plot(res, out.with_suffix(".png"))
    click.echo(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
