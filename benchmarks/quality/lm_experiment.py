"""Multi-teacher KD of a small causal LM on three text domains, CPU-sized ("Prove it on real data", 2b).

    python -m benchmarks.quality.lm_experiment --out benchmarks/quality/_work/lm

Data (`lm_data`): Shakespeare, the KJV bible and the Python 3.11 docs, split by document into train and
held-out; ``--n-train`` passages (<= 128 SmolLM2 tokens) per domain form one mixed transfer set,
``--n-eval`` passages per domain from held-out documents form one eval cache per domain.

Teachers (all with SmolLM2's tokenizer, vocab 49,152): ``smollm2`` = SmolLM2-135M-Instruct (generalist)
and ``spec_<domain>`` = a Llama (2 layers, width 128, the ``tiny_llama`` architecture) trained from
scratch for ``--spec-steps`` steps on passages of that domain's train documents only. Each is cached
once, top-64 (u8log values, exact tail), on the transfer set and on every eval cache; ``smollm2_sampled``
is SmolLM2 cached with ``--samples N`` on the transfer set, N chosen so its bytes/position roughly match
the top-64 run's (simulated from the top-64 targets, then measured with ``inspect_cache``).

Student: Llama (2 layers, width ``--student-hidden``, SmolLM2's vocabulary, tied head), random init per
seed, ``--steps`` AdamW steps of ``--batch`` passages (lr 1e-2, 1 warm-up step, cosine), loss
0.5 forward-KL (T = 1, tail as one bucket: the operators merge the teachers on the union of their
supports and the loss makes one pass over the vocabulary) + 0.5 CE on the next token. Runs per seed: ``no_kd`` (alpha = 0);
the number of teachers 1 -> 4 with the entropy operator (SmolLM2, + each specialist in turn); every
operator over all 4 teachers (mean, entropy, confidence, routing domain -> its specialist, loglinear,
label_aware); and SmolLM2 sampled vs top-k at equal bytes. Nothing is tuned: every setting above was
fixed before the first run, and held-out data is only ever scored.

Held-out perplexity per domain and overall (pooled over positions). Teachers are scored from their
cached eval targets (`evaluate_teachers`: a true token outside the top-64 gets the tail spread
uniformly, so their perplexity is an upper bound). Every stage is idempotent: finished caches,
specialists and runs (OUT/runs/<seed>/<name>/result.json) are reused when the command is repeated.
Writes ``benchmarks/results/lm_results.json``, ``lm_teachers.png``, ``lm_operators.png``; prints tables.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._models import ensure_smollm2, tiny_llama
from benchmarks.quality.lm_data import DOMAINS, build_splits
from mtkd_cache import RunConfig, TopkBlock, inspect_cache, open_cache, prepare, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.evaluate import evaluate_student, evaluate_teachers
from mtkd_train.recipe import DistillRecipe

__all__ = ["Settings", "main", "run_experiment"]

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
MAX_LENGTH = 128
TOP_K = 64
GENERALIST = "smollm2"
SAMPLED = "smollm2_sampled"
SPECIALISTS = tuple(f"spec_{d}" for d in DOMAINS)
OPERATORS = ("mean", "entropy", "confidence", "routing", "loglinear", "label_aware")


@dataclass(frozen=True)
class Settings:
    """Sizes and hyper-parameters of the experiment (CLI flags of the same names).

    The defaults were sized to ~35 min on 2 CPU cores shared with other jobs (load average 4-11),
    from the throughput measured first: SmolLM2 caching 20-67 tokens/s, one student step of 4
    passages (~450 tokens) 1.2-15 s. Measured with them: 34 min (see benchmarks/README.md).
    """

    n_train: int = 11
    """Transfer passages per domain (the mixed train cache holds 3x this)."""
    n_eval: int = 8
    """Held-out passages per domain."""
    n_specialist: int = 256
    """Train-document passages per domain a specialist samples its batches from."""
    spec_steps: int = 10
    """Optimizer steps of each specialist (batch `batch`)."""
    steps: int = 8
    """Student optimizer steps per run."""
    batch: int = 4
    """Passages per step (student and specialists)."""
    student_hidden: int = 128
    """Student width (2 layers, head tied to the 49,152-token embedding)."""
    alpha: float = 0.5
    """KD weight of every KD run (1 - alpha on the next-token CE)."""
    lr: float = 1e-2
    """Peak learning rate of students and specialists (1 warm-up step, cosine to 10%)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Student seeds (init and data order); data, teachers and specialists use seed 0."""


# Settings that change the data, the specialists or the caches (the rest only change student runs).
_CACHE_KEYS = ("n_train", "n_eval", "n_specialist", "spec_steps", "batch", "lr")


# -- teachers ------------------------------------------------------------------------------------
def _batches(ids: Sequence[Sequence[int]], batch: int, steps: int, seed: int, pad: int):  # noqa: ANN202
    """`steps` random batches of whole passages: (input_ids, attention_mask, labels) each (B, L)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch:
            order += rng.sample(range(len(ids)), len(ids))
        pick, order = order[:batch], order[batch:]
        width = max(len(ids[i]) for i in pick)
        x = torch.full((batch, width), pad, dtype=torch.long)
        m = torch.zeros((batch, width), dtype=torch.long)
        for b, i in enumerate(pick):
            x[b, : len(ids[i])] = torch.tensor(ids[i])
            m[b, : len(ids[i])] = 1
        yield x, m, torch.where(m.bool(), x, torch.full_like(x, -100))


def train_specialist(dest: Path, smol: Path, texts: Sequence[str], s: Settings, seed: int = 0) -> dict[str, Any]:
    """Train a 2-layer width-128 Llama from scratch on `texts` (one domain's train passages); save to `dest`."""
    done = dest / "lm_specialist.json"
    if done.is_file():
        return json.loads(done.read_text())
    from transformers import AutoTokenizer, LlamaForCausalLM

    t0 = time.perf_counter()
    init = tiny_llama(dest.with_name(dest.name + "_init"), smol, layers=2, hidden=128, seed=seed)
    tok = AutoTokenizer.from_pretrained(str(smol))
    model = LlamaForCausalLM.from_pretrained(str(init)).train()
    ids = [tok(t, add_special_tokens=False)["input_ids"][:MAX_LENGTH] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 1) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, k / max(1, s.spec_steps))))))
    torch.manual_seed(seed)
    losses = []
    for x, m, y in _batches(ids, s.batch, s.spec_steps, seed, tok.pad_token_id or 0):
        loss = model(input_ids=x, attention_mask=m, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.save_pretrained(str(dest), safe_serialization=True)
    tok.save_pretrained(str(dest))
    info = {"steps": s.spec_steps, "batch": s.batch, "passages": len(ids), "tokens_seen": s.spec_steps * s.batch
            * int(np.mean([len(i) for i in ids])), "first_train_loss": losses[0], "final_train_loss": losses[-1],
            "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(info))
    return info


def _cache_teacher(cache: Path, name: str, model: Path, **kw: Any) -> dict[str, float]:
    """Run one teacher over `cache`; wall time and tokens/s of the run that computed it (kept in the cache folder)."""
    log = cache / "lm_teacher_timings.json"
    timings = json.loads(log.read_text()) if log.is_file() else {}
    if name in timings and name in open_cache(cache).teacher_names:
        return timings[name]
    t0 = time.perf_counter()
    run_teacher(cache, RunConfig(teacher=name, model=str(model), batch_size=8, **kw), progress=False)
    sec = time.perf_counter() - t0
    pos = open_cache(cache).inputs.num_positions
    timings[name] = {"seconds": sec, "positions": pos, "tokens_per_s": pos / sec}
    log.write_text(json.dumps(timings, indent=2))
    return timings[name]


def simulate_sampled_bpp(cache: Path, teacher: str, draws: Sequence[int], seed: int = 0) -> dict[int, float]:
    """Estimated bytes/position of `--samples N` targets, drawn from the cached top-k (+ uniform tail).

    Mirrors the writer's layout (uint16 indices ascending, padded with the last token; uint16 counts,
    0 on padding), compressed per chunk with zstd level 3 like the cache's default. An estimate for
    choosing N; the real run's bytes/position is measured afterwards.
    """
    from numcodecs import Zstd

    reader = open_cache(cache)
    vocab = reader.teacher(teacher).meta.vocab_size
    rng = np.random.default_rng(seed)
    out: dict[int, float] = {}
    for n in draws:
        total, rows = 0, 0
        for c in range(reader.num_chunks):
            block = reader.read_chunk(c, teachers=[teacher]).targets[teacher]
            assert isinstance(block, TopkBlock)
            p = np.exp(block.logp.astype(np.float64))
            p = np.concatenate([p * (1 - block.tail[:, None]) / p.sum(-1, keepdims=True), block.tail[:, None]], -1)
            idx = np.empty((len(p), n), np.uint16)
            cnt = np.zeros((len(p), n), np.uint16)
            for r in range(len(p)):
                k = rng.choice(p.shape[1], size=n, p=p[r] / p[r].sum())
                toks = np.where(k < block.indices.shape[1], block.indices[r, np.minimum(k, block.indices.shape[1] - 1)],
                                rng.integers(0, vocab, size=n))
                u, c_u = np.unique(toks, return_counts=True)
                idx[r, : len(u)], idx[r, len(u):], cnt[r, : len(u)] = u, u[-1], c_u
            total += len(Zstd(level=3).encode(idx.tobytes())) + len(Zstd(level=3).encode(cnt.tobytes()))
            rows += len(p)
        out[n] = total / rows
    return out


def build_teachers(out: Path, smol: Path, s: Settings, caches: Mapping[str, Path], data: Path) -> dict[str, Any]:
    """Train the specialists and cache every teacher on the transfer set and each eval cache."""
    info: dict[str, Any] = {"cache_runs": {}}
    for d, name in zip(DOMAINS, SPECIALISTS):
        texts = [json.loads(line)["text"] for line in (data / f"specialist_{d}.jsonl").open()]
        info[name] = {"train": train_specialist(out / "teachers" / name, smol, texts[: s.n_specialist], s)}
    models = {GENERALIST: smol, **{n: out / "teachers" / n for n in SPECIALISTS}}
    for name, model in models.items():
        for split, cache in caches.items():
            info["cache_runs"][f"{name}@{split}"] = _cache_teacher(cache, name, model, top_k=TOP_K)
    topk_bpp = inspect_cache(caches["train"])["teachers"][GENERALIST]["bytes_per_position"]
    sim = simulate_sampled_bpp(caches["train"], GENERALIST, (32, 64, 128, 192, 256, 384))
    draws = min(sim, key=lambda n: abs(sim[n] - topk_bpp))
    info["cache_runs"][f"{SAMPLED}@train"] = _cache_teacher(caches["train"], SAMPLED, smol, top_k=None, samples=draws)
    rep = inspect_cache(caches["train"])["teachers"]
    info["bytes"] = {"topk_bytes_per_position": topk_bpp, "simulated_sampled_bpp": sim, "draws": draws,
                     "sampled_bytes_per_position": rep[SAMPLED]["bytes_per_position"],
                     "per_teacher": {n: rep[n]["bytes_per_position"] for n in rep}}
    return info


# -- students ------------------------------------------------------------------------------------
def student_config(dest: Path, smol: Path, hidden: int) -> Path:
    """An HF config folder (no weights): the recipe initialises it from the run's seed."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(smol))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=2,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=MAX_LENGTH * 2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    dest.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(dest))
    return dest


def run_specs() -> list[dict[str, Any]]:
    """Every student run of one seed: (name, group, teachers, aggregate, aggregate_kwargs, kd)."""
    allt = (GENERALIST, *SPECIALISTS)
    runs = [dict(name="no_kd", group="baseline", teachers=(GENERALIST,), aggregate="entropy", kd=False)]
    for n in range(1, len(allt) + 1):
        runs.append(dict(name=f"teachers_{n}", group="teachers", teachers=allt[:n], aggregate="entropy", kd=True))
    routes = {d: f"spec_{d}" for d in DOMAINS}
    for op in OPERATORS:
        if op != "entropy":  # entropy over all teachers is teachers_4
            akw = {"domain_to_teacher": routes} if op == "routing" else {}
            runs.append(dict(name=f"op_{op}", group="operators", teachers=allt, aggregate=op, kd=True, akw=akw))
    runs.append(dict(name="sampled_smollm2", group="sampled", teachers=(SAMPLED,), aggregate="entropy", kd=True))
    return runs


def _pooled(per_domain: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    n = sum(r["positions"] for r in per_domain.values())
    nll = sum(r["nll"] * r["positions"] for r in per_domain.values()) / n
    return {"positions": n, "nll": nll, "perplexity": math.exp(nll)}


def student_run(run_dir: Path, spec: Mapping[str, Any], student: Path, caches: Mapping[str, Path], s: Settings,
                seed: int) -> dict[str, Any]:
    """Train one student from the transfer cache and score it on every held-out cache."""
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run restarts from step 0
    t0 = time.perf_counter()
    cfg = TrainConfig(cache=str(caches["train"]), teachers=tuple(spec["teachers"]), student=str(student),
                      out=str(run_dir), aggregate=spec["aggregate"], aggregate_kwargs=spec.get("akw", {}),
                      loss="forward_kl", tail_mode="bucket", alpha=s.alpha if spec["kd"] else 0.0, temperature=1.0,
                      batch_size=s.batch, max_steps=s.steps, lr=s.lr, warmup_steps=1, checkpoint_every=s.steps,
                      seed=seed, eval_cache=str(caches[DOMAINS[0]]))
    recipe = DistillRecipe(cfg).setup()
    losses = recipe.train()
    train_s = time.perf_counter() - t0
    held = {d: evaluate_student(recipe.student, open_cache(caches[d]), batch_size=s.batch, device=recipe.device,
                                vocab_size=recipe.vocab_size) for d in DOMAINS}
    res = {k: v for k, v in spec.items() if k != "akw"} | {
        "aggregate_kwargs": spec.get("akw", {}), "seed": seed, "alpha": cfg.alpha, "steps": s.steps,
        "first_loss": losses[0], "final_loss": losses[-1], "train_seconds": train_s,
        "seconds_per_step": train_s / s.steps,
        "eval_seconds": time.perf_counter() - t0 - train_s,
        "held_out": {**{d: {k: held[d][k] for k in ("positions", "nll", "perplexity", "accuracy", "ece")}
                        for d in DOMAINS}, "overall": _pooled(held)}}
    res["teachers"] = list(res["teachers"])
    done.write_text(json.dumps(res, indent=2))
    return res


def score_teachers(caches: Mapping[str, Path]) -> dict[str, Any]:
    """Each top-k teacher's held-out perplexity per domain, from its cached eval targets."""
    names = (GENERALIST, *SPECIALISTS)
    per = {d: evaluate_teachers(open_cache(caches[d]), names) for d in DOMAINS}
    counts = {d: open_cache(caches[d]).inputs.num_positions - open_cache(caches[d]).inputs.num_samples for d in DOMAINS}
    out: dict[str, Any] = {}
    for n in names:
        dom = {d: {"positions": counts[d], **per[d][n]} for d in DOMAINS}
        out[n] = {**dom, "overall": _pooled(dom)}
    return out


# -- summary, tables, plots -----------------------------------------------------------------------
def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Run name -> domain (and overall) -> mean / std (sample std; 0 with one seed) / n of held-out perplexity."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(r["name"] for r in runs):
        rs = [r for r in runs if r["name"] == name]
        out[name] = {}
        for d in (*DOMAINS, "overall"):
            v = [r["held_out"][d]["perplexity"] for r in rs]
            out[name][d] = {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
    return out


def _cell(m: Mapping[str, float]) -> str:
    return f"{m['mean']:.1f} ± {m['std']:.1f}" if m["n"] > 1 else f"{m['mean']:.1f}"


def tables(summary: Mapping[str, Any], teachers: Mapping[str, Any], label: Mapping[str, str]) -> str:
    """Markdown tables: teachers, student vs number of teachers, student per operator."""
    cols = (*DOMAINS, "overall")
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    lines = ["Teachers (held-out perplexity from their cached top-64 targets):\n", head]
    for n, t in teachers.items():
        lines.append(f"| {n} | " + " | ".join(f"{t[d]['perplexity']:.1f}" for d in cols) + " |\n")
    for title, names in (("Student vs number of teachers (entropy operator):", [
            "no_kd", *[f"teachers_{i}" for i in range(1, 5)]]),
            ("Student per operator, all 4 teachers (+ SmolLM2 sampled vs top-k at equal bytes):", [
            "no_kd", "teachers_1", "sampled_smollm2", *[f"op_{o}" if o != "entropy" else "teachers_4"
                                                        for o in OPERATORS]])):
        lines += [f"\n{title}\n\n", head]
        for n in names:
            name = "entropy (4 teachers)" if (n == "teachers_4" and "operator" in title) else label[n]
            if n in summary:
                lines.append(f"| {name} | " + " | ".join(_cell(summary[n][d]) for d in cols) + " |\n")
    return "".join(lines)


def labels() -> dict[str, str]:
    lab = {"no_kd": "no KD (alpha = 0)", "sampled_smollm2": "SmolLM2 sampled (equal bytes), entropy"}
    names = ["SmolLM2", "+ spec_shakespeare", "+ spec_kjv", "+ spec_python (all 4)"]
    lab |= {f"teachers_{i + 1}": f"{i + 1}: {n}" for i, n in enumerate(names)}
    lab |= {f"op_{o}": f"{o} (4 teachers)" for o in OPERATORS}
    lab["teachers_1"] = "1: SmolLM2 top-64"
    return lab


def plot(summary: Mapping[str, Any], teachers: Mapping[str, Any], results_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = (*DOMAINS, "overall")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    xs = [1, 2, 3, 4]
    for ax, d in zip(axes, cols):
        m = [summary[f"teachers_{i}"][d]["mean"] for i in xs]
        e = [summary[f"teachers_{i}"][d]["std"] for i in xs]
        ax.errorbar(xs, m, yerr=e, marker="o", capsize=3, label="student (entropy)")
        ax.axhline(summary["no_kd"][d]["mean"], color="grey", ls="--", label="student, no KD")
        ax.set(title=d, xlabel="teachers: SmolLM2, +shk, +kjv, +py", xticks=xs, ylabel="held-out perplexity")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Student held-out perplexity vs number of teachers (SmolLM2 alone: "
                 f"{teachers[GENERALIST]['overall']['perplexity']:.1f} overall)")
    fig.tight_layout()
    p1 = results_dir / "lm_teachers.png"
    fig.savefig(p1, dpi=100)
    plt.close(fig)
    names = ["teachers_1", "sampled_smollm2", *[f"op_{o}" if o != "entropy" else "teachers_4" for o in OPERATORS]]
    lab = labels() | {"teachers_4": "entropy (4 teachers)"}
    fig, ax = plt.subplots(figsize=(13, 4.5))
    w = 0.8 / len(names)
    for i, n in enumerate(names):  # change of held-out perplexity relative to the no-KD student
        rel = [100 * (summary[n][d]["mean"] / summary["no_kd"][d]["mean"] - 1) for d in cols]
        ax.bar(np.arange(len(cols)) + i * w, rel, w, label=lab[n])
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xticks=np.arange(len(cols)) + 0.4 - w / 2, xticklabels=cols,
           ylabel="held-out perplexity vs no-KD student (%)",
           title="Student per operator (all 4 teachers) and SmolLM2 alone, top-64 vs sampled; below 0 = better than no KD")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    p2 = results_dir / "lm_operators.png"
    fig.savefig(p2, dpi=100)
    plt.close(fig)
    return [p1, p2]


# -- the pipeline ---------------------------------------------------------------------------------
def prepare_caches(out: Path, smol: Path, s: Settings) -> tuple[dict[str, Path], dict[str, Any]]:
    """Write the data splits and prepare the mixed transfer cache and one eval cache per domain."""
    from transformers import AutoTokenizer

    data = out / "data"
    splits_file = data / "splits.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())
    else:
        splits = build_splits(data, AutoTokenizer.from_pretrained(str(smol)), max_tokens=MAX_LENGTH,
                              n_train=s.n_train, n_eval=s.n_eval, n_specialist=s.n_specialist)
    caches = {"train": out / "caches" / "train", **{d: out / "caches" / f"heldout_{d}" for d in DOMAINS}}
    prepare(caches["train"], data / "train.jsonl", tokenizer=smol, max_length=MAX_LENGTH, domain_column="domain",
            progress=False)
    for d in DOMAINS:
        prepare(caches[d], data / f"heldout_{d}.jsonl", tokenizer=smol, max_length=MAX_LENGTH,
                domain_column="domain", progress=False)
    for name, c in caches.items():
        inp = open_cache(c).inputs
        splits.setdefault("caches", {})[name] = {"samples": inp.num_samples, "positions": inp.num_positions}
    return caches, splits


def _claim_workdir(out: Path, s: Settings) -> None:
    """Reuse what `out` holds only where it was made with the same settings.

    Other data/teacher settings wipe `out` (`prepare` reuses a cache whose settings, including the
    source *path*, match, without re-reading the file); other student settings wipe `out/runs`.
    """
    want = {k: v for k, v in asdict(s).items() if k != "seeds"}
    marker = out / "settings.json"
    if out.exists() and not marker.is_file() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty and was not made by lm_experiment; choose another folder")
    if marker.is_file():
        old = json.loads(marker.read_text())
        if any(old.get(k) != want[k] for k in _CACHE_KEYS):
            shutil.rmtree(out)
        elif old != want:
            shutil.rmtree(out / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(want, indent=2))


def run_experiment(out: Path, s: Settings, results_dir: Path = RESULTS_DIR) -> dict[str, Any]:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    _claim_workdir(out, s)
    smol = ensure_smollm2()
    seconds: dict[str, float] = {}
    caches, splits = prepare_caches(out, smol, s)
    seconds["data_and_prepare"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    teacher_info = build_teachers(out, smol, s, caches, out / "data")
    seconds["teachers"] = time.perf_counter() - t1
    teachers = score_teachers(caches)
    student = student_config(out / "student_config", smol, s.student_hidden)
    runs = []
    t2 = time.perf_counter()
    for seed in s.seeds:
        for spec in run_specs():
            r = student_run(out / "runs" / f"seed{seed}" / spec["name"], spec, student, caches, s, seed)
            print(f"seed {seed} {r['name']:<18} overall ppl {r['held_out']['overall']['perplexity']:8.1f} "
                  f"({r['train_seconds']:.0f} s)", flush=True)
            runs.append(r)
    seconds["students"] = time.perf_counter() - t2
    summary = summarize(runs)
    seconds["total"] = time.perf_counter() - t0
    seconds["specialists_train"] = sum(teacher_info[n]["train"]["seconds"] for n in SPECIALISTS)
    seconds["teacher_caching"] = sum(r["seconds"] for r in teacher_info["cache_runs"].values())
    seconds["student_runs"] = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)
    report = {"settings": asdict(s), "splits": splits, "teachers": {"held_out": teachers, **teacher_info},
              "runs": runs, "summary": summary, "seconds": seconds,
              "note": "data_and_prepare/teachers/students/total: this invocation's wall time (stages reused from "
                      "an earlier invocation take ~0 s); specialists_train/teacher_caching/student_runs: the "
                      "recorded cost of computing them, whichever invocation did"}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "lm_results.json").write_text(json.dumps(report, indent=2))
    text = tables(summary, teachers, labels())
    (out / "tables.md").write_text(text)
    plot(summary, teachers, results_dir)
    print(text)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/quality/_work/lm"), help="work folder (caches, runs)")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="where lm_results.json and the plots go")
    for f in Settings.__dataclass_fields__.values():
        if f.name == "seeds":
            ap.add_argument("--seeds", type=int, nargs="+", default=list(f.default), help="student seeds")
        else:
            ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                            help=f"default {f.default}")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plots from RESULTS/lm_results.json")
    a = vars(ap.parse_args())
    out, results = a.pop("out"), a.pop("results")
    if a.pop("plot_only"):
        rep = json.loads((results / "lm_results.json").read_text())
        plot(rep["summary"], rep["teachers"]["held_out"], results)
        return
    a["seeds"] = tuple(a["seeds"])
    run_experiment(out, Settings(**a), results)


if __name__ == "__main__":
    main()
