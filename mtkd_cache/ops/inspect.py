"""`inspect_cache`: what a cache holds, how big it is per position, and how its teachers agree.

Per-teacher statistics come from `teacher.json` (computed over every position at run time);
entropy/tail histograms and the top-1 agreement matrix are computed from up to `max_chunks`
evenly spaced chunks, so inspecting a large remote cache stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mtkd_cache.format.kinds import NoTargetsBlock
from mtkd_cache.format.reader import CacheReader, SampledBlock, TopkBlock, open_cache

__all__ = ["inspect_cache", "plot_report", "format_report"]


def _top1(block: TopkBlock | SampledBlock) -> np.ndarray:
    score = block.logp if isinstance(block, TopkBlock) else block.counts
    return block.indices[np.arange(len(block.indices)), score.argmax(-1)]


def _entropy(block: TopkBlock | SampledBlock, vocab: int) -> np.ndarray:
    """Entropy estimate per row: top-k part exact, tail spread uniformly over the other tokens."""
    if isinstance(block, SampledBlock):
        p = block.counts / np.maximum(block.counts.sum(-1, keepdims=True), 1)
        return -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(-1)
    p = np.exp(block.logp)
    t = block.tail.astype(np.float64)
    rest = max(vocab - block.indices.shape[1], 1)
    tail_term = np.where(t > 0, -t * np.log(np.where(t > 0, t, 1) / rest), 0.0)
    return -(p * block.logp).sum(-1) + tail_term


def inspect_cache(url: str | os.PathLike[str] | CacheReader, *, max_chunks: int = 8,
                  storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Summarise a cache: samples, positions, per-teacher size and fidelity, top-1 agreement.

    Returns:
        A JSON-able dict (see `mtkd-cache inspect --json`).
    """
    reader = url if isinstance(url, CacheReader) else open_cache(url, storage_options)
    inp = reader.inputs
    report: dict[str, Any] = {
        "url": reader.url, "format_version": reader.manifest.format_version,
        "samples": inp.num_samples, "positions": inp.num_positions, "chunks": inp.grid.num_chunks,
        "input_kind": inp.kind, "dataset_fingerprint": inp.dataset_fingerprint,
        "tokenizer": None if inp.tokenizer is None else inp.tokenizer.name_or_path,
        "inputs_bytes": reader.store.size_of("inputs"),
        "teachers": {}, "incomplete_teachers": reader.incomplete_teachers(),
    }
    names = reader.teacher_names
    chunks = sorted(set(np.linspace(0, inp.grid.num_chunks - 1, min(max_chunks, inp.grid.num_chunks)).astype(int)))
    top1: dict[str, list[np.ndarray]] = {n: [] for n in names}
    hist: dict[str, dict[str, list[float]]] = {n: {"entropy": [], "tail": []} for n in names}
    # feature-only teachers have no distribution; teachers on their own tokenization, not the inputs' rows
    scored = [n for n in names if reader.teacher(n).meta.target.kind != "none"
              and reader.teacher(n).meta.tokenization is None]
    for c in chunks:
        data = reader.read_chunk(int(c), teachers=scored)
        for n in scored:
            block = data.targets[n]
            assert not isinstance(block, NoTargetsBlock)
            top1[n].append(_top1(block))
            hist[n]["entropy"].extend(_entropy(block, reader.teacher(n).meta.vocab_size).tolist())
            if isinstance(block, TopkBlock):
                hist[n]["tail"].extend(block.tail.tolist())
    for n in names:
        m = reader.teacher(n).meta
        positions = max(1, int(m.stats.get("positions", 0)))
        report["teachers"][n] = {
            "model": m.model, "task": m.task, "grid": m.grid, "kind": m.target.kind,
            "k": m.target.k, "draws": m.target.draws, "temperature": m.target.temperature,
            "vocab_size": m.vocab_size, "values": m.values.codec, "index_dtype": m.index_dtype,
            "features": [f.to_dict() for f in m.features],
            "bytes": m.stats.get("bytes"), "bytes_per_position": m.stats.get("bytes", 0) / positions,
            "bytes_per_sample": m.stats.get("bytes", 0) / max(1, inp.num_samples),
            "mean_tail_mass": m.stats.get("mean_tail"), "mean_entropy": m.stats.get("mean_entropy"),
            "mean_top1_prob": m.stats.get("mean_top1_prob"),
            "fidelity_kept_mass": None if m.stats.get("mean_tail") is None else 1.0 - m.stats["mean_tail"],
            "tokenization": m.tokenization,
        }
    comparable = [n for n in scored if len(top1[n]) and sum(map(len, top1[n])) == sum(map(len, top1[scored[0]]))]
    agree = np.eye(len(comparable))
    for i, a in enumerate(comparable):
        for j, b in enumerate(comparable):
            if i < j:
                x, y = np.concatenate(top1[a]), np.concatenate(top1[b])
                agree[i, j] = agree[j, i] = float((x == y).mean()) if len(x) else float("nan")
    report["agreement"] = {"teachers": comparable, "top1": agree.round(4).tolist(), "chunks_sampled": len(chunks)}
    report["_hist"] = hist
    return report


def format_report(r: Mapping[str, Any]) -> str:
    lines = [f"cache {r['url']} (format v{r['format_version']})",
             f"  samples {r['samples']:,}  positions {r['positions']:,}  chunks {r['chunks']}  inputs "
             f"{r['input_kind']}  ({r['inputs_bytes'] / 1e6:.2f} MB)",
             f"  dataset fingerprint {r['dataset_fingerprint']}"]
    if r["incomplete_teachers"]:
        lines.append(f"  INCOMPLETE teachers: {', '.join(r['incomplete_teachers'])}")
    for n, t in r["teachers"].items():
        if t["kind"] == "none":
            feats = ", ".join(f"layer {f['layer']} {f['dim']}-d {f['pool']} {f['dtype']}" for f in t["features"])
            lines.append(f"  teacher {n}: {t['task']} features only ({feats})  "
                         f"{t['bytes_per_position']:.1f} B/position  {t['bytes_per_sample']:.1f} B/sample")
            continue
        what = f"top-{t['k']}" if t["kind"] == "topk" else f"{t['draws']} draws"
        tail = "" if t["mean_tail_mass"] is None else f"  mean tail {t['mean_tail_mass']:.4f}"
        lines.append(f"  teacher {n}: {t['task']} {what} ({t['values']}, {t['index_dtype']})  "
                     f"{t['bytes_per_position']:.1f} B/position{tail}  mean entropy {t['mean_entropy']:.3f}")
    ag = r["agreement"]
    if len(ag["teachers"]) > 1:
        lines.append("  top-1 agreement:")
        for n, row in zip(ag["teachers"], ag["top1"]):
            lines.append(f"    {n:>12} " + " ".join(f"{v:6.3f}" for v in row))
    return "\n".join(lines)


def plot_report(r: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Entropy and tail-mass histograms per teacher and the top-1 agreement matrix, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for n, h in r["_hist"].items():
        axes[0].hist(h["entropy"], bins=40, alpha=0.5, label=n)
        if h["tail"]:
            axes[1].hist(h["tail"], bins=40, alpha=0.5, label=n)
    axes[0].set(title="entropy per position (nats)", xlabel="H", ylabel="positions")
    axes[1].set(title="tail mass per position", xlabel="1 - sum p_topk")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    ag = r["agreement"]
    im = axes[2].imshow(np.array(ag["top1"]) if ag["teachers"] else np.zeros((1, 1)), vmin=0, vmax=1, cmap="viridis")
    axes[2].set(title="top-1 agreement", xticks=range(len(ag["teachers"])), yticks=range(len(ag["teachers"])))
    axes[2].set_xticklabels(ag["teachers"], rotation=45, ha="right")
    axes[2].set_yticklabels(ag["teachers"])
    fig.colorbar(im, ax=axes[2])
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
