"""Peak host memory of one teacher batch: the LM head per row block against full logits (issue 15).

    python -m benchmarks.head_blocks            # ~30 s: two fresh processes, one per path

A random Llama (2 layers, width 64) with V = 65,536 runs one batch of B = 8, L = 256 through
`chunk._forward_reduce` (forward + top-64 reduction, fp32 on the CPU), once with the head applied
per row block (`headblocks`) and once with the full (B, L, V) logits (the split disabled). Each path
runs in its own process; reported: growth of the peak RSS over the batch (after a warm-up batch),
and whether the two paths' top-k indices and log-probabilities are equal.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

V, B, L = 65_536, 8, 256


def _one(mode: str, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import mtkd_cache.precompute.chunk as chunk
    from mtkd_cache.format.meta import TargetSpec
    from mtkd_cache.precompute.models import LoadedTeacher

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    module = LlamaForCausalLM(config).eval().requires_grad_(False)
    teacher = LoadedTeacher(module=module, task="causal_lm", model_id="bench", revision=None, weights_hash="",
                            vocab_size=V, padded_vocab_size=V, num_layers=2, hidden_size=64, tokenizer_path=None)
    if mode == "full":
        chunk.head_split = lambda teacher, batch: None  # type: ignore[assignment]

    class Meta:  # the fields `_forward_reduce` reads
        target = TargetSpec(kind="topk", k=64)
        features = ()
        grid = "token"

    batch = {"input_ids": torch.randint(0, V, (B, L)), "attention_mask": torch.ones(B, L, dtype=torch.int64)}
    cpu, gen = torch.device("cpu"), (lambda device: torch.Generator().manual_seed(0))
    chunk._forward_reduce(teacher, Meta, {k: v[:1, :8] for k, v in batch.items()}, cpu, torch.float32, None, gen)  # type: ignore[arg-type]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _, reduced, _ = chunk._forward_reduce(teacher, Meta, batch, cpu, torch.float32, None, gen)  # type: ignore[arg-type]
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    np.save(out, torch.stack([reduced[0].float(), reduced[1]]).numpy())
    print(json.dumps({"mode": mode, "peak_rss_growth_mb": grown}))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for mode in ("blocked", "full"):
            out = str(Path(tmp) / f"{mode}.npy")
            proc = subprocess.run([sys.executable, "-m", "benchmarks.head_blocks", mode, out], check=True,
                                  capture_output=True, text=True)
            rows[mode] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_growth_mb"]
        equal = bool(np.array_equal(np.load(Path(tmp) / "blocked.npy"), np.load(Path(tmp) / "full.npy")))
    logits_mb = B * L * V * 4 / 2**20
    print(f"B={B} L={L} V={V}: full logits {logits_mb:.0f} MB; peak RSS growth: head per row block "
          f"{rows['blocked']:.0f} MB, full logits {rows['full']:.0f} MB; top-k arrays equal: {equal}")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        _one(sys.argv[1], sys.argv[2])
    else:
        main()
