"""Size against fidelity of stored top-k targets, on SmolLM2-135M over Shakespeare.

One teacher pass keeps, per real position, the 128 most likely tokens (float64 log-probs), the
exact mass outside them and ``S = sum_v p_v log p_v`` over the whole vocabulary. From that, for
every k <= 128 and every encoding, without another forward:

* bytes per position: the teacher's arrays (indices, values, tail) written with the cache's
  layout (one shard per chunk, ~8k-row inner chunks, padding rows zero) into a zarr store, stored
  bytes / real positions. The mtkd-native encodings are also written through `TeacherWriter`;
  its group adds commit markers, chunks.parquet and teacher.json (`group_overhead` in the JSON);
* truncation error: mean KL(p || q), q = p on the top k and the tail spread uniformly over the
  V - k other tokens: ``KL = (S - sum_topk p log p) - tail log(tail / (V - k))``, exact in float64;
* encoding error: mean KL(P || Q) over the k + 1 outcomes (top-k, tail): P exact, Q the stored
  values decoded and renormalised so that ``sum q_topk = 1 - tail_stored``. A tail that fp16
  rounds to 0 is read as the smallest fp16 subnormal (2**-24): a consumer that took 0 literally
  would get an infinite KL for a mass below 6e-8.

Encodings: values u8log with step 1/8, 1/16, 1/32 and fp16; index layouts sorted-ascending uint16
(mtkd's) with zstd at several levels, blosc(zstd) with byte or bit shuffle, an explicit delta
filter (numcodecs Delta, not part of the zarr v3 spec), and probability order (values sorted,
indices not) for comparison.

    python -m benchmarks.size_fidelity            # ~5 min forward (cached in --work), ~2 min encoding

Writes benchmarks/results/size_fidelity.json and size_fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import MemoryStore

from benchmarks._models import default_smollm2_dir, ensure_smollm2
from benchmarks.precompute_overhead import prepare_cache
from mtkd_cache.format.codecs import decode_values, encode_values
from mtkd_cache.format.meta import TargetSpec, TeacherMeta, ValueEncoding
from mtkd_cache.format.reader import CacheReader
from mtkd_cache.format.store import CacheStore
from mtkd_cache.format.targets import TeacherWriter
from mtkd_cache.precompute.batching import length_grouped_batches, pad_batch
from mtkd_cache.precompute.forward import forward_teacher
from mtkd_cache.precompute.models import load_teacher

__all__ = ["Codec", "main", "teacher_pass"]

RESULTS = Path(__file__).parent / "results"
KMAX = 128
_FP16_MIN = 2.0**-24

# Published reference points (bytes per position), for the table in benchmarks/README.md.
PUBLISHED_AT = {  # label -> (k, bytes per position)
    "fp16 + int32, k=64, raw": (64, 64 * (2 + 4)),
    "Megatron-LM K=128, pre-zstd": (128, 528),
    "DistillKit k=128": (128, 300),
}
PUBLISHED = {label: nbytes for label, (_, nbytes) in PUBLISHED_AT.items()}


# -- teacher pass ----------------------------------------------------------------------------------
def teacher_pass(cache: Path, model_dir: Path, *, batch_size: int, out: Path) -> dict[str, Any]:
    """Top-128 log-probs (desc), exact tails and sum p log p for every real position, per chunk.

    Cached in `out` (npz); rows of each chunk are in sample order, as the runner writes them.
    """
    if out.exists():
        with np.load(out) as z:
            return {k: z[k] for k in z.files}
    reader = CacheReader(CacheStore(cache))
    tok = reader.inputs.tokenizer
    pad_id = tok.pad_token_id if tok and tok.pad_token_id is not None else 0
    teacher = load_teacher(str(model_dir), device=torch.device("cpu"), dtype=torch.float32)
    vocab = teacher.vocab_size
    parts: dict[str, list[np.ndarray]] = {"idx": [], "logp": [], "tail": [], "plogp": [], "chunk": []}
    t0 = time.perf_counter()
    for c in range(reader.inputs.grid.num_chunks):
        data = reader.read_chunk(c)
        toks = data.inputs["token_ids"]
        lengths = data.lengths.tolist()
        per_sample: list[tuple[np.ndarray, ...]] = [()] * len(lengths)
        for idx in length_grouped_batches(lengths, None, batch_size):
            batch = pad_batch([toks[data.offsets[i]: data.offsets[i] + lengths[i]] for i in idx], pad_id)
            logits, _ = forward_teacher(teacher, batch, want_hidden=False)
            res = _reduce(logits[..., :vocab].reshape(-1, vocab))  # (B*T, ...) each
            width = logits.shape[1]
            for b, i in enumerate(idx):
                rows = slice(b * width, b * width + lengths[i])
                per_sample[i] = tuple(r[rows] for r in res)
        for j, key in enumerate(("idx", "logp", "tail", "plogp")):
            parts[key].append(np.concatenate([s[j] for s in per_sample]))
        parts["chunk"].append(np.full(sum(lengths), c, dtype=np.int32))
        print(f"teacher pass: chunk {c + 1}/{reader.inputs.grid.num_chunks}, {time.perf_counter() - t0:.0f}s")
    arrays = {k: np.concatenate(v) for k, v in parts.items()}
    arrays["vocab"] = np.array(vocab)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **arrays)  # type: ignore[arg-type]  # numpy's stub types the first kwarg as allow_pickle
    return arrays


def _reduce(flat: torch.Tensor, block: int = 16) -> tuple[np.ndarray, ...]:
    """(N, V) logits -> top-128 indices/log-probs (descending), exact tail, sum p log p; float64."""
    idx, logp, tail, plogp = [], [], [], []
    for s in range(0, flat.shape[0], block):
        z = flat[s: s + block].to(torch.float64)
        lp = z - torch.logsumexp(z, dim=-1, keepdim=True)  # (n, V)
        plogp.append((lp.exp() * lp).sum(-1))
        v, i = torch.topk(lp, KMAX, dim=-1, sorted=True)  # (n, 128), descending
        rest = lp.scatter(-1, i, float("-inf"))
        tail.append(torch.logsumexp(rest, dim=-1).exp())
        idx.append(i.to(torch.int32))
        logp.append(v)
    return tuple(torch.cat(x).numpy() for x in (idx, logp, tail, plogp))


# -- fidelity --------------------------------------------------------------------------------------
def exact_topk(t: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k indices (by probability), their log-probs and the exact tail mass, float64."""
    logp = t["logp"][:, :k]
    tail = t["tail"] + np.exp(t["logp"][:, k:]).sum(-1)
    return t["idx"][:, :k], logp, tail


def truncation_kl(t: dict[str, np.ndarray], k: int) -> np.ndarray:
    """KL(full || top-k exact + tail spread uniformly over the V - k others), per position."""
    _, logp, tail = exact_topk(t, k)
    vocab = int(t["vocab"])
    rest_plogp = t["plogp"] - (np.exp(logp) * logp).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        uniform = np.where(tail > 0, tail * np.log(tail / (vocab - k)), 0.0)
    return np.maximum(rest_plogp - uniform, 0.0)


def encoding_kl(logp: np.ndarray, tail: np.ndarray, enc: ValueEncoding, tail_dtype: str = "float16") -> np.ndarray:
    """KL(exact top-k + tail || stored, decoded, renormalised top-k + stored tail), per position."""
    stored = decode_values(encode_values(logp.astype(np.float32), enc), enc).astype(np.float64)  # (R, k)
    tail_s = np.asarray(tail, dtype=tail_dtype).astype(np.float64)
    tail_s = np.where(tail_s > 0, tail_s, _FP16_MIN)
    q = np.exp(stored)
    log_q = stored + np.log((1.0 - tail_s) / q.sum(-1))[:, None]
    kl_top = (np.exp(logp) * (logp - log_q)).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_tail = np.where(tail > 0, tail * (np.log(tail) - np.log(tail_s)), 0.0)
    return kl_top + kl_tail


# -- size ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Codec:
    """How the three arrays are compressed; `native` = expressible in mtkd's teacher.json."""

    name: str
    compressor: dict[str, Any]
    index_filter: str | None = None  # "delta": numcodecs Delta on the indices
    order: str = "index"  # "index": sorted ascending (mtkd); "prob": by probability, descending

    @property
    def native(self) -> bool:
        return self.index_filter is None and self.order == "index"


CODECS = [
    Codec("zstd-1", {"name": "zstd", "level": 1}),
    Codec("zstd-3", {"name": "zstd", "level": 3}),
    Codec("zstd-9", {"name": "zstd", "level": 9}),
    Codec("zstd-19", {"name": "zstd", "level": 19}),
    Codec("blosc-shuffle-5", {"name": "blosc", "level": 5, "shuffle": "shuffle"}),
    Codec("blosc-bitshuffle-5", {"name": "blosc", "level": 5, "shuffle": "bitshuffle"}),
    Codec("delta+zstd-3", {"name": "zstd", "level": 3}, index_filter="delta"),
    Codec("delta+blosc-shuffle-5", {"name": "blosc", "level": 5, "shuffle": "shuffle"}, index_filter="delta"),
    Codec("prob-order+zstd-3", {"name": "zstd", "level": 3}, order="prob"),
]


def _compressor(d: dict[str, Any]) -> Any:
    if d["name"] == "zstd":
        return ZstdCodec(level=d["level"])
    return BloscCodec(cname="zstd", clevel=d["level"], shuffle=d.get("shuffle", "shuffle"))


def layout_arrays(t: dict[str, np.ndarray], k: int, enc: ValueEncoding, order: str) -> dict[str, np.ndarray]:
    """The stored arrays (real rows only): uint16 indices, encoded values, fp16 tail."""
    idx, logp, tail = exact_topk(t, k)
    if order == "index":
        perm = np.argsort(idx, axis=-1, kind="stable")
        idx = np.take_along_axis(idx, perm, -1)
        logp = np.take_along_axis(logp, perm, -1)
    return {"indices": idx.astype(np.uint16), "values": encode_values(logp.astype(np.float32), enc),
            "tail": tail.astype(np.float16)}


def stored_bytes(arrays: dict[str, np.ndarray], chunks: np.ndarray, grid: Any, codec: Codec) -> tuple[dict[str, int], float]:
    """Bytes per array written with the cache's layout; and seconds spent writing (encode+compress)."""
    store = MemoryStore()
    root = zarr.open_group(store, mode="w")
    comp = _compressor(codec.compressor)
    seconds = 0.0
    sizes = {}
    for name, rows in arrays.items():
        filters = []
        if name == "indices" and codec.index_filter == "delta":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from zarr.codecs.numcodecs import Delta

                filters = [Delta(dtype="<u2")]
        shape = rows.shape[1:]
        arr = root.create_array(name, shape=(grid.total_positions, *shape), dtype=rows.dtype,
                                chunks=(grid.inner_positions, *shape), shards=(grid.chunk_positions, *shape),
                                filters=filters, compressors=comp, fill_value=0)
        for c in range(grid.num_chunks):
            r0, r1 = grid.position_range(c)
            block = np.zeros((r1 - r0, *shape), dtype=rows.dtype)
            real = rows[chunks == c]
            block[: len(real)] = real
            t0 = time.perf_counter()
            arr[r0:r1] = block
            seconds += time.perf_counter() - t0
        sizes[name] = sum(len(v.to_bytes()) for key, v in store._store_dict.items() if key.startswith(f"{name}/"))
    return sizes, seconds


def writer_bytes(cache: Path, t: dict[str, np.ndarray], k: int, enc: ValueEncoding, codec: Codec) -> int:
    """Stored bytes of a teacher group written through mtkd's own `TeacherWriter`."""
    store = CacheStore(cache)
    reader = CacheReader(store)
    name = "size_fidelity_check"
    meta = TeacherMeta(name=name, model="benchmarks.size_fidelity", task="causal_lm", weights_hash="-", dtype="float32",
                       vocab_size=int(t["vocab"]), padded_vocab_size=int(t["vocab"]), grid="token",
                       target=TargetSpec("topk", k=k), values=enc, index_dtype="uint16", tail_dtype="float16",
                       compressor=dict(codec.compressor), dataset_fingerprint=reader.inputs.dataset_fingerprint,
                       tokenizer_fingerprint=reader.inputs.tokenizer.fingerprint if reader.inputs.tokenizer else None)
    idx, logp, tail = exact_topk(t, k)
    writer = TeacherWriter(store, meta, reader.inputs, overwrite=True)
    for c in range(reader.inputs.grid.num_chunks):
        sel = t["chunk"] == c
        perm = np.argsort(idx[sel], axis=-1, kind="stable")
        writer.write_chunk(c, indices=np.take_along_axis(idx[sel], perm, -1),
                           logp=np.take_along_axis(logp[sel], perm, -1).astype(np.float32), tail=tail[sel],
                           stats={"positions": float(sel.sum())})
    size = int(writer.finish().stats["bytes"])
    store.remove(f"teachers/{name}")
    return size


VALUES = {
    "u8log/8": ValueEncoding("u8log", 1 / 8),
    "u8log/16": ValueEncoding("u8log", 1 / 16),
    "u8log/32": ValueEncoding("u8log", 1 / 32),
    "fp16": ValueEncoding("fp16", 1 / 16),
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48, help="samples of --max-length tokens (48 x 512 = 24,576)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--ks", default="8,16,32,64,128")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "mtkd" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS / "size_fidelity.json")
    ap.add_argument("--plot", type=Path, default=RESULTS / "size_fidelity.png")
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from an existing --out")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    if args.replot:
        result = json.loads(args.out.read_text())
        plot(result, args.plot)
        return result

    model_dir = ensure_smollm2(args.model_dir or default_smollm2_dir())
    cache = prepare_cache(args.work, model_dir, max_length=args.max_length, samples=args.samples,
                          chunk_samples=max(1, 32768 // args.max_length))
    t = teacher_pass(cache, model_dir, batch_size=args.batch_size,
                     out=args.work / f"size_fidelity_topk_L{args.max_length}_n{args.samples}.npz")
    grid = CacheReader(CacheStore(cache)).inputs.grid
    positions = len(t["tail"])
    print(f"{positions} positions, vocab {int(t['vocab'])}, mean tail@64 {exact_topk(t, 64)[2].mean():.4f}")

    records: list[dict[str, Any]] = []
    for k in ks:
        trunc = float(truncation_kl(t, k).mean())
        _, logp, tail = exact_topk(t, k)
        for vname, enc in VALUES.items():
            enc_kl = encoding_kl(logp, tail, enc)
            for codec in CODECS:
                arrays = layout_arrays(t, k, enc, codec.order)
                sizes, seconds = stored_bytes(arrays, t["chunk"], grid, codec)
                rec = {"k": k, "values": vname, "codec": codec.name, "native": codec.native,
                       "bytes_per_position": sum(sizes.values()) / positions,
                       "bytes_per_position_by_array": {n: s / positions for n, s in sizes.items()},
                       "truncation_kl": trunc, "encoding_kl": float(enc_kl.mean()),
                       "encoding_kl_p99": float(np.quantile(enc_kl, 0.99)),
                       "write_us_per_position": 1e6 * seconds / positions}
                records.append(rec)
            print(f"k={k:3d} {vname:9s} trunc {trunc:.4f} enc {enc_kl.mean():.2e} "
                  + " ".join(f"{r['codec']}={r['bytes_per_position']:.1f}" for r in records[-len(CODECS):]))
    # Cross-check the layout model against the real writer for the default encoding.
    default = next(r for r in records if r["k"] == 64 and r["values"] == "u8log/16" and r["codec"] == "zstd-3")
    check = writer_bytes(cache, t, 64, VALUES["u8log/16"], CODECS[1]) / positions
    result = {
        "teacher": "SmolLM2-135M-Instruct", "data": f"Shakespeare, {args.samples} x {args.max_length} tokens",
        "positions": positions, "vocab": int(t["vocab"]),
        "mean_tail": {k: float(exact_topk(t, k)[2].mean()) for k in ks},
        "mean_entropy": float(-t["plogp"].mean()),
        "writer_check": {"k": 64, "values": "u8log/16", "codec": "zstd-3", "layout_model_bpp": default["bytes_per_position"],
                         "teacher_writer_bpp": check, "group_overhead_bpp": check - default["bytes_per_position"]},
        "published_bytes_per_position": PUBLISHED, "records": records,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.plot)
    return result


def plot(result: dict[str, Any], path: Path, codec: str = "zstd-3") -> None:
    """Bytes/position vs truncation KL, one line per value encoding (at `codec`); encoding KL vs k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    for vname in VALUES:
        rows = sorted((r for r in result["records"] if r["values"] == vname and r["codec"] == codec), key=lambda r: r["k"])
        ax.plot([r["bytes_per_position"] for r in rows], [r["truncation_kl"] for r in rows], "o-", label=f"{vname}, {codec}")
        for r in rows:
            if vname == "u8log/16":
                ax.annotate(f"k={r['k']}", (r["bytes_per_position"], r["truncation_kl"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=8)
        ax2.plot([r["k"] for r in rows], [r["encoding_kl"] for r in rows], "o-", label=vname)
    # Smallest mtkd-native codec per k that writes at least ~100k positions/s (zstd-19 does not).
    best = [min((r for r in result["records"] if r["values"] == "u8log/16" and r["k"] == k and r["native"]
                 and r["write_us_per_position"] < 10), key=lambda r: r["bytes_per_position"])
            for k in sorted({r["k"] for r in result["records"]})]
    ax.plot([r["bytes_per_position"] for r in best], [r["truncation_kl"] for r in best], "k--", lw=1,
            label="u8log/16, smallest fast native codec per k")
    trunc_at = {r["k"]: r["truncation_kl"] for r in result["records"]}
    for n, (label, (k, nbytes)) in enumerate(PUBLISHED_AT.items()):
        if k in trunc_at:
            ax.plot([nbytes], [trunc_at[k]], "s", color="grey")
            ax.annotate(label, (nbytes, trunc_at[k]), textcoords="offset points", xytext=(0, 8 + 10 * (n % 2)),
                        fontsize=7, ha="center", color="dimgrey")
    ax.axvline(128, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [16, 32, 64, 128, 256, 512]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("stored bytes per position (indices + values + tail)")
    ax.set_ylabel("truncation KL(full || top-k + uniform tail), nats")
    ax.set_title(f"SmolLM2-135M on Shakespeare, {result['positions']} positions")
    ax.legend(fontsize=8)
    ax2.axhline(1e-3, color="grey", ls=":", lw=1)
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("k")
    ax2.set_ylabel("encoding KL over k+1 outcomes, nats")
    ax2.set_title("value encoding error (fp16 tail)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
