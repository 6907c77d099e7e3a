"""The models of the training benchmarks, and the online-distillation baseline they are compared to.

Benchmark-only code: `mtkd_train` never loads a teacher. Here, as in classic online KD, the
teachers stay resident and run at every student step, and the KD term is computed on their full
vocabulary distributions.

Models (all random Llamas built from configs; nothing is downloaded or trained):

* `save_llama` writes a Llama-style causal LM with an untied head. Its LM head is scaled so the
  logits have standard deviation `logit_std`: a randomly initialised head gives near-uniform
  next-token distributions (entropy ~ log V), whose top-k codes compress unrealistically well and
  whose tail holds almost all the mass. With `logit_std` 4.0-5.5 the teachers have a mean entropy
  of 2.0-3.5 nats, a top-1 probability of 0.29-0.50 and a top-64 tail of 2-12% (V = 8,192), in
  the range of trained LMs.
* `save_student_config` writes the student as a config-only folder; `mtkd_train.student.load_student`
  initialises it from the config, exactly as `mtkd-train --student DIR` does.

The online objective (`online_entropy_kd`) is the dense twin of the cached objective
`mtkd_train.objective.Objective` with `aggregate="entropy"`, `loss="forward_kl"`, T = 1:
per position, teacher weights `w = softmax_i(-H_i / tau)`, merged target `m = sum_i w_i p_i` over
all V tokens, loss `alpha * KL(m || q) + (1 - alpha) * CE`. Cost per step: N teacher forwards of
B x L tokens plus O(N P V) for the softmaxes, entropies and the mixture (P = real positions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from mtkd_train.objective import row_labels

__all__ = [
    "OnlineTeachers",
    "llama_config",
    "matmul_params",
    "online_entropy_kd",
    "online_step_loss",
    "save_llama",
    "save_student_config",
]

_INIT_STD = 0.02  # LlamaConfig.initializer_range default: the head's init std before scaling


def llama_config(*, vocab: int, hidden: int, layers: int, intermediate: int, max_length: int) -> LlamaConfig:
    """A Llama config with 64-wide heads, grouped KV (one KV head per two query heads), untied head."""
    heads = max(1, hidden // 64)
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_length,
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3,
        initializer_range=_INIT_STD, architectures=["LlamaForCausalLM"],
    )


def matmul_params(config: LlamaConfig) -> int:
    """Parameters that cost 2 FLOPs per token in a forward pass: every weight but the input embedding.

    (Attention scores add 4 * L * d per token and layer, < 5% here at L = 128; not counted.)
    """
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    return n * per_layer + d * config.vocab_size  # + LM head


def save_llama(path: Path, config: LlamaConfig, *, seed: int, logit_std: float,
               tokenizer: PreTrainedTokenizerBase) -> Path:
    """Initialise a Llama from `config` (seeded), scale its head to `logit_std`, save it with `tokenizer`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # final RMSNorm output has unit RMS, so logit std = init std * sqrt(d) * scale
        model.lm_head.weight.mul_(logit_std / (_INIT_STD * math.sqrt(config.hidden_size)))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def save_student_config(path: Path, config: LlamaConfig) -> Path:
    """Write a config-only student folder (no weights): `load_student` initialises it from the config."""
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    return path


class OnlineTeachers:
    """N causal-LM teachers held in memory in eval mode; `logits` runs all of them on a batch.

    Args:
        folders: The teachers' model folders (as `save_llama` writes them).
        vocab_size: Real vocabulary V; logits beyond it are dropped.
    """

    def __init__(self, folders: Sequence[Path], vocab_size: int):
        self.models = [AutoModelForCausalLM.from_pretrained(str(f), dtype=torch.float32).eval() for f in folders]
        for m in self.models:
            m.requires_grad_(False)
        self.vocab_size = vocab_size

    @torch.no_grad()
    def logits(self, batch: Mapping[str, Any], rows: torch.Tensor) -> list[torch.Tensor]:
        """Each teacher's logits at the real rows: N tensors (P, V)."""
        out = []
        for m in self.models:
            z = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V_pad)
            out.append(z[rows][:, : self.vocab_size].float())  # (P, V)
        return out


def online_entropy_kd(student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor], labels: torch.Tensor,
                      *, alpha: float, tau: float = 1.0) -> torch.Tensor:
    """Dense entropy-weighted multi-teacher KD: `alpha * KL(m || q) + (1 - alpha) * CE`.

    Args:
        student_logits: (P, V) student logits at the real rows.
        teacher_logits: N tensors (P, V), no gradient.
        labels: (P,) next-token labels, -100 where there is none.
        alpha: Weight of the KD term.
        tau: Temperature of the softmax over teachers (`EntropyAggregator.tau`).

    Returns:
        Scalar loss.
    """
    logq = torch.log_softmax(student_logits.float(), dim=-1)  # (P, V)
    with torch.no_grad():
        logp = torch.stack([torch.log_softmax(z, dim=-1) for z in teacher_logits], dim=1)  # (P, N, V)
        p = logp.exp()
        entropy = -(p * logp).sum(-1)  # (P, N)
        w = torch.softmax(-entropy / tau, dim=1)  # (P, N)
        m = torch.einsum("pn,pnv->pv", w, p)  # (P, V)
        m_logm = torch.where(m > 0, m * m.clamp_min(1e-45).log(), 0.0).sum(-1)  # (P,)
    kd = (m_logm - (m * logq).sum(-1)).mean()
    ce = F.nll_loss(logq, labels, ignore_index=-100)
    return alpha * kd + (1 - alpha) * ce


def online_step_loss(student: Any, teachers: OnlineTeachers, batch: Mapping[str, Any], *, alpha: float) -> torch.Tensor:
    """Student forward + all teachers + dense KD for one batch (the online baseline's step, before backward)."""
    rows = batch["position_mask"]  # (B, L)
    logits, _ = student.forward(batch)  # (B, L, V)
    labels = row_labels(batch, "causal_lm")[rows]  # (P,)
    return online_entropy_kd(logits[rows][:, : teachers.vocab_size], teachers.logits(batch, rows), labels,
                             alpha=alpha)
