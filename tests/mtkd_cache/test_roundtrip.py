"""Round trip: what `run_teacher` stores is what the teacher computes, read back by `open_cache`.

The reference is always the teacher's own forward pass on the unpadded sample, with
``log_softmax`` over the real vocabulary (``logits[..., :vocab_size]``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import (
    BERT_LABELS,
    LM_VOCAB,
    MAX_LENGTH,
    TOKENIZER_SIZE,
    TOP_K,
)
from helpers import tiny_models
from helpers.tiny_models import save_tiny_causal_lm, save_tiny_vit_classifier
from transformers import LlamaForCausalLM, ViTForImageClassification

from mtkd_cache import RunConfig, TopkBlock, open_cache, prepare, prepare_arrays, run_teacher
from mtkd_cache.encoding import index_dtype_for

TIE_GAP = 1e-4
"""Rows whose k-th and (k+1)-th reference log-probs are closer than this may swap the last index
(the cached forward runs padded batches, the reference does not); their sets are not compared."""


def check_topk_rows(block: TopkBlock, ref: torch.Tensor, *, value_atol: float, tail_atol: float) -> int:
    """Compare cached top-k rows with reference log-probs (R, V); return how many rows had sets checked.

    Indices as sets per row, values at the cached indices within ``value_atol``, tail to
    ``1 - sum p_topk`` within ``tail_atol``.
    """
    k = block.indices.shape[1]
    assert block.indices.shape == (ref.shape[0], k)
    assert np.all(np.diff(block.indices, axis=1) > 0), "indices must be distinct and ascending per row"
    assert block.indices.min() >= 0 and block.indices.max() < ref.shape[1], "index outside the real vocabulary"
    ranked = torch.sort(ref, dim=-1, descending=True).values  # (R, V)
    ref_idx = torch.topk(ref, k, dim=-1).indices.numpy()  # (R, k)
    checked = 0
    for r in range(ref.shape[0]):
        if k == ref.shape[1] or ranked[r, k - 1] - ranked[r, k] > TIE_GAP:
            assert set(block.indices[r].tolist()) == set(ref_idx[r].tolist()), f"row {r}"
            checked += 1
    at_cached = torch.gather(ref, -1, torch.from_numpy(block.indices)).numpy()  # (R, k)
    np.testing.assert_allclose(block.logp, at_cached, rtol=0, atol=value_atol)
    np.testing.assert_allclose(block.tail, 1.0 - np.exp(at_cached).sum(-1), rtol=0, atol=tail_atol)
    return checked


def test_topk_u8log_equals_teacher_log_softmax_over_real_vocab(
    lm_template: Path, lm_logp: Callable[[np.ndarray], torch.Tensor]
) -> None:
    reader = open_cache(lm_template)
    meta = reader.teacher("lm").meta
    assert (meta.vocab_size, meta.padded_vocab_size) == (TOKENIZER_SIZE, LM_VOCAB)
    assert meta.values.codec == "u8log" and meta.tail_dtype == "float16"
    step = meta.values.step
    rows = checked = 0
    padding_would_win = False
    for sid in range(reader.inputs.num_samples):
        s = reader.sample(sid, teachers=["lm"])
        ref = lm_logp(s["token_ids"])  # (T, V)
        assert ref.min() > -255 * step, "no code is clipped, so every value obeys the step/2 bound"
        # u8log: |decoded - logp| <= step / 2; fp16 tail: 1e-3.
        checked += check_topk_rows(s["targets"]["lm"], ref, value_atol=step / 2 + 1e-6, tail_atol=1e-3)
        rows += len(ref)
        padded = lm_logp.__closure__  # noqa: F841 - keep the reference function simple
        full = _full_width_topk(reader, sid)
        padding_would_win |= bool((full >= TOKENIZER_SIZE).any())
    assert rows == reader.inputs.num_positions
    assert checked >= 0.9 * rows
    assert padding_would_win, "the test LM's padded head columns must matter for this test to bite"


@pytest.fixture(scope="module")
def _full_width_model(lm_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(lm_dir).eval()


def _full_width_topk(reader, sid: int) -> np.ndarray:  # noqa: ANN001
    # Filled in by the fixture below (module-level model cache).
    model = _MODEL_CACHE["lm"]
    ids = torch.as_tensor(reader.sample(sid)["token_ids"])[None]
    with torch.no_grad():
        return model(ids).logits[0].topk(TOP_K, dim=-1).indices.numpy()


_MODEL_CACHE: dict[str, LlamaForCausalLM] = {}
