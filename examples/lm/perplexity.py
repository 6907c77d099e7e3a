"""Held-out bits per byte of a causal LM on each domain: the measure that compares tokenizers.

Perplexity per token depends on the tokenizer (Gemma-3's 262k ids make longer tokens than
SmolLM2's 49k), so teachers of different families are compared in bits per UTF-8 byte of the
held-out text: the summed negative log-likelihood of every token of a segment, in bits, over the
segment's bytes. Each segment is scored on its own, after one context token (the tokenizer's BOS,
else its EOS, the document separator), in windows of ``window`` tokens that each carry the last
token of the previous window as context, so every byte of the text is predicted exactly once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = ["segment_nll", "heldout_bits_per_byte"]


@torch.no_grad()
def segment_nll(model: torch.nn.Module, ids: list[int], context: int, window: int) -> float:
    """Summed NLL (nats) of `ids` given one `context` token, scored in windows of `window` tokens."""
    seq = [context, *ids]
    total = 0.0
    for start in range(0, len(ids), window):
        chunk = torch.tensor([seq[start:start + window + 1]])  # (1, <= window + 1): context + targets
        logits = model(input_ids=chunk[:, :-1]).logits.float()  # (1, T, V)
        total += torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
    return total


def heldout_bits_per_byte(model_dir: Path, data_dir: Path, domain: str, *, window: int = 1024,
                          max_segments: int | None = None) -> dict[str, float]:
    """Bits per byte and per-token perplexity of the model in `model_dir` on `domain`'s held-out split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    context = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if context is None:
        raise ValueError(f"{model_dir}: the tokenizer has neither a BOS nor an EOS token to start a segment with")
    lines = (data_dir / f"{domain}.heldout.jsonl").read_text(encoding="utf-8").splitlines()[:max_segments]
    nll = 0.0
    n_bytes = n_tokens = 0
    for line in tqdm(lines, desc=f"{model_dir.name} on {domain}", unit="segment", leave=False):
        text = json.loads(line)["text"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        nll += segment_nll(model, ids, context, window)
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
    return {"bits_per_byte": nll / math.log(2) / n_bytes, "token_perplexity": math.exp(nll / n_tokens),
            "tokens": n_tokens, "bytes": n_bytes, "segments": len(lines)}
