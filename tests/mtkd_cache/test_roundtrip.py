"""Round trip: what `run_teacher` stores is what the teacher computes, read back by `open_cache`.

The reference is always the teacher's own forward pass on the unpadded sample, with
``log_softmax`` over the real vocabulary (``logits[..., :vocab_size]``); the tiny LM's head is
wider than its tokenizer and its padding columns have large logits, so a softmax over the padded
width would fail these tests.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import tiny_models
from helpers.tiny_models import save_tiny_causal_lm, save_tiny_vit_classifier
from transformers import BertForSequenceClassification, LlamaForCausalLM, ViTForImageClassification

from mtkd_cache import (
    RunConfig,
    SampledBlock,
    TopkBlock,
    open_cache,
    prepare,
    prepare_arrays,
    run_teacher,
)
from mtkd_cache.format.codecs import index_dtype_for
from tests.mtkd_cache.conftest import BERT_LABELS, LM_VOCAB, TOKENIZER_SIZE, TOP_K

TIE_GAP = 1e-4
"""Rows whose k-th and (k+1)-th reference log-probs are closer than this may legitimately swap
the last kept index (the runner's padded batches round differently from the reference); their
index sets are not compared."""
FP32_ATOL = 2e-6
"""fp32 values carry no quantisation: only the float32 round-off of a batched vs unbatched forward."""


def check_topk_rows(
    block: TopkBlock, ref: torch.Tensor, *, value_atol: float, tail_atol: float
) -> int:
    """Compare cached top-k rows with reference log-probs ``ref`` (R, V).

    Indices as sets per row (except near-ties), values at the cached indices within
    ``value_atol``, tail against ``1 - sum p_topk`` within ``tail_atol``.

    Returns:
        How many rows had their index sets compared.
    """
    k = block.indices.shape[1]
    assert block.indices.shape == (ref.shape[0], k)
    assert np.all(np.diff(block.indices, axis=1) > 0), (
        "indices must be distinct and ascending per row"
    )
    assert block.indices.min() >= 0 and block.indices.max() < ref.shape[1], (
        "index outside the real vocabulary"
    )
    top = torch.topk(ref, min(k + 1, ref.shape[1]), dim=-1)  # (R, k + 1): the k kept and the next
    ranked, ref_idx = top.values, top.indices[:, :k].numpy()
    compared = 0
    for r in range(ref.shape[0]):
        if k == ref.shape[1] or ranked[r, k - 1] - ranked[r, k] > TIE_GAP:
            assert set(block.indices[r].tolist()) == set(ref_idx[r].tolist()), f"row {r}"
            compared += 1
    at_cached = torch.gather(ref, -1, torch.from_numpy(block.indices)).numpy()  # (R, k)
    np.testing.assert_allclose(block.logp, at_cached, rtol=0, atol=value_atol)
    np.testing.assert_allclose(block.tail, 1.0 - np.exp(at_cached).sum(-1), rtol=0, atol=tail_atol)
    return compared


@pytest.fixture(scope="module")
def fp32_cache(
    tmp_path_factory: pytest.TempPathFactory, inputs_template: Path, lm_dir: Path
) -> Path:
    cache = Path(shutil.copytree(inputs_template, tmp_path_factory.mktemp("fp32") / "cache"))
    run_teacher(
        cache,
        RunConfig(
            teacher="f32", model=str(lm_dir), top_k=TOP_K, value_codec="fp32", tail_dtype="float32"
        ),
        progress=False,
    )
    return cache


# --- top-k targets of a causal LM ---------------------------------------------------------------


def test_topk_u8log_equals_teacher_log_softmax_over_real_vocab(
    lm_template: Path, lm_model: LlamaForCausalLM, lm_logp: Callable[[np.ndarray], torch.Tensor]
) -> None:
    reader = open_cache(lm_template)
    meta = reader.teacher("lm").meta
    assert (meta.vocab_size, meta.padded_vocab_size) == (TOKENIZER_SIZE, LM_VOCAB)
    assert (meta.values.codec, meta.tail_dtype, meta.index_dtype) == ("u8log", "float16", "uint16")
    group = zarr.open_group(str(lm_template / "teachers" / "lm"), mode="r")
    assert (group["indices"].dtype, group["values"].dtype) == (np.uint16, np.uint8)
    step = meta.values.step
    rows = compared = padded_in_full_topk = 0
    for sid in range(reader.inputs.num_samples):
        s = reader.sample(sid, teachers=["lm"])
        ref = lm_logp(s["token_ids"])  # (T, V)
        assert ref.min() > -254 * step, "no code is clipped, so every value obeys the step/2 bound"
        # u8log rounds to a grid of `step` nats: the error bound is step / 2. fp16 tail: 1e-3.
        compared += check_topk_rows(
            s["targets"]["lm"], ref, value_atol=step / 2 + 1e-6, tail_atol=1e-3
        )
        rows += len(ref)
        with torch.no_grad():
            full = lm_model(torch.as_tensor(s["token_ids"])[None]).logits[0]  # (T, 72)
        padded_in_full_topk += int(
            (full.topk(TOP_K, dim=-1).indices >= TOKENIZER_SIZE).any(-1).sum()
        )
    assert rows == reader.inputs.num_positions
    assert compared >= 0.9 * rows
    # The head's padding columns would be in most top-k rows if they were not cut off.
    assert padded_in_full_topk > 0.5 * rows


def test_fp32_values_and_tail_carry_no_quantisation(
    fp32_cache: Path, lm_logp: Callable[[np.ndarray], torch.Tensor]
) -> None:
    reader = open_cache(fp32_cache)
    group = zarr.open_group(str(fp32_cache / "teachers" / "f32"), mode="r")
    assert (group["values"].dtype, group["tail"].dtype) == (np.float32, np.float32)
    for sid in range(reader.inputs.num_samples):
        s = reader.sample(sid, teachers=["f32"])
        check_topk_rows(
            s["targets"]["f32"], lm_logp(s["token_ids"]), value_atol=FP32_ATOL, tail_atol=FP32_ATOL
        )


def test_row_j_is_the_teacher_distribution_over_token_j_plus_1(
    fp32_cache: Path, lm_model: LlamaForCausalLM, lm_logp: Callable[[np.ndarray], torch.Tensor]
) -> None:
    """Row j = the teacher's prediction after reading tokens 0..j; the last row predicts past the end."""
    reader = open_cache(fp32_cache)
    same = shifted = total = 0
    for sid in (0, 7, 20):
        s = reader.sample(sid, teachers=["f32"])
        ids, block = s["token_ids"], s["targets"]["f32"]
        assert len(block.indices) == len(ids) == s["num_positions"]  # no row dropped, none added
        cached_top1 = block.indices[np.arange(len(ids)), block.logp.argmax(-1)]  # (T,)
        ref = lm_logp(ids)
        for j in range(len(ids)):
            with torch.no_grad():  # the model's own next-token prediction from the prefix 0..j
                nxt = int(
                    lm_model(torch.as_tensor(ids[: j + 1])[None])
                    .logits[0, -1, :TOKENIZER_SIZE]
                    .argmax()
                )
            top2 = torch.topk(ref[j], 2).values
            if top2[0] - top2[1] > TIE_GAP:
                assert cached_top1[j] == nxt, f"sample {sid} row {j}"
            same += int(cached_top1[j] == nxt)
            shifted += int(j + 1 < len(ids) and cached_top1[j + 1] == nxt)
            total += 1
    assert same >= 0.9 * total and shifted < 0.5 * total


# --- the 16-bit and the wide index path -------------------------------------------------------


def test_index_dtype_is_16_bit_up_to_65536_tokens_then_32_bit() -> None:
    assert index_dtype_for(TOKENIZER_SIZE) == "uint16"
    assert index_dtype_for(1 << 16) == "uint16"  # ids 0..65535 fit
    assert index_dtype_for((1 << 16) + 1) == "uint32"
    assert index_dtype_for(140_000) == "uint32"


def test_wide_vocabulary_round_trips_indices_above_65535(tmp_path: Path) -> None:
    vocab = 140_000
    lm = save_tiny_causal_lm(
        tmp_path / "wide", vocab_size=vocab, hidden_size=16, num_layers=1, tokenizer_size=vocab
    )
    rng = random.Random(1)
    with (tmp_path / "wide.jsonl").open("w") as f:
        for _ in range(6):
            words = [f"w{rng.randrange(65_600, vocab - 4)}" for _ in range(rng.randint(4, 16))] + [
                "w7"
            ]
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    cache = tmp_path / "cache"
    prepare(
        cache, tmp_path / "wide.jsonl", tokenizer=lm, max_length=16, chunk_samples=4, progress=False
    )
    meta = run_teacher(
        cache,
        RunConfig(
            teacher="wide", model=str(lm), top_k=16, value_codec="fp32", tail_dtype="float32"
        ),
        progress=False,
    )
    assert meta.index_dtype == "uint32" and meta.vocab_size == vocab
    assert zarr.open_array(str(cache / "teachers/wide/indices"), mode="r").dtype == np.uint32
    assert zarr.open_array(str(cache / "inputs/token_ids"), mode="r").dtype == np.int32
    model = LlamaForCausalLM.from_pretrained(lm).eval()
    reader = open_cache(cache)
    big_inputs = big_indices = 0
    for sid in range(reader.inputs.num_samples):
        s = reader.sample(sid, teachers=["wide"])
        big_inputs += int((s["token_ids"] > 0xFFFF).sum())
        with torch.no_grad():
            ref = torch.log_softmax(
                model(torch.as_tensor(s["token_ids"])[None]).logits[0, :, :vocab], -1
            )
        check_topk_rows(s["targets"]["wide"], ref, value_atol=FP32_ATOL, tail_atol=FP32_ATOL)
        big_indices += int((s["targets"]["wide"].indices > 0xFFFF).sum())
    assert big_inputs > 0 and big_indices > 0, "ids above 65535 must actually be exercised"


# --- sampled targets --------------------------------------------------------------------------


DRAWS = 16
TEMPERATURE = 0.05
"""The tiny teacher is nearly uniform at temperature 1; sharpening it gives the estimator test power."""


@pytest.fixture(scope="module")
def sampled_cache(
    tmp_path_factory: pytest.TempPathFactory, inputs_template: Path, lm_dir: Path
) -> Path:
    cache = Path(shutil.copytree(inputs_template, tmp_path_factory.mktemp("sampled") / "cache"))
    for name, seed in (("s", 0), ("s_again", 0), ("s_seed1", 1)):
        run_teacher(
            cache,
            RunConfig(
                teacher=name,
                model=str(lm_dir),
                top_k=None,
                samples=DRAWS,
                seed=seed,
                temperature=TEMPERATURE,
            ),
            progress=False,
        )
    return cache


def test_sampled_counts_sum_to_draws_and_estimate_the_teacher_softmax(
    sampled_cache: Path, lm_logp: Callable[[np.ndarray], torch.Tensor]
) -> None:
    reader = open_cache(sampled_cache)
    meta = reader.teacher("s").meta
    assert (meta.target.kind, meta.target.draws, meta.grid) == ("sample", DRAWS, "token")
    assert meta.target.temperature == TEMPERATURE
    estimate, probs, untempered = [], [], []
    for sid in range(reader.inputs.num_samples):
        s = reader.sample(sid, teachers=["s"])
        block = s["targets"]["s"]
        assert isinstance(block, SampledBlock)
        assert block.indices.shape == block.counts.shape == (s["num_positions"], DRAWS)
        np.testing.assert_array_equal(block.counts.sum(-1), DRAWS)
        assert block.indices.max() < TOKENIZER_SIZE, "draws only from the real vocabulary"
        used = block.counts > 0  # distinct tokens first, ascending; count-0 slots are padding
        assert np.all(used[:, :-1] >= used[:, 1:])
        for r in range(len(block.indices)):
            assert np.all(np.diff(block.indices[r, used[r]]) > 0)
        dense = np.zeros((len(block.indices), TOKENIZER_SIZE))
        np.add.at(
            dense, (np.arange(len(block.indices))[:, None], block.indices), block.counts / DRAWS
        )
        estimate.append(dense)
        logp = lm_logp(s["token_ids"])  # (T, V) at temperature 1
        probs.append(torch.softmax(logp / TEMPERATURE, -1).numpy())
        untempered.append(logp.exp().numpy())
    est, p = np.concatenate(estimate), np.concatenate(probs)  # (R, V) each
    rows = len(p)
    # count_rv ~ Binomial(DRAWS, p_rv), independent over rows, so the mean over rows of
    # count/DRAWS has variance sum_r p(1-p) / (DRAWS R^2). Each token's mean must lie within
    # 5 binomial standard deviations of the teacher's mean probability (64 tokens: a false
    # alarm has probability < 1e-4).
    std = np.sqrt((p * (1 - p)).sum(0) / DRAWS) / rows  # (V,)
    z = (est.mean(0) - p.mean(0)) / std
    assert np.abs(z).max() < 5.0, (
        f"worst token {int(np.abs(z).argmax())}: z = {np.abs(z).max():.2f}"
    )
    # The same bound rejects the untempered softmax by a wide margin (the test has power).
    assert np.abs((est.mean(0) - np.concatenate(untempered).mean(0)) / std).max() > 10.0


def test_sampled_targets_are_deterministic_given_the_seed(sampled_cache: Path) -> None:
    root = sampled_cache / "teachers"
    for name in ("indices", "counts"):
        a = zarr.open_array(str(root / "s" / name), mode="r")[:]
        b = zarr.open_array(str(root / "s_again" / name), mode="r")[:]
        c = zarr.open_array(str(root / "s_seed1" / name), mode="r")[:]
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c), "another --seed must draw differently"


# --- features -----------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["none", "mean"])
@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_features_equal_hidden_states_within_encoding_tolerance(
    pool: str,
    dtype: str,
    copy_cache: Callable[..., Path],
    inputs_template: Path,
    lm_dir: Path,
    lm_model: LlamaForCausalLM,
) -> None:
    cache = copy_cache(inputs_template)
    layers = (0, -1)
    run_teacher(
        cache,
        RunConfig(
            teacher="t", model=str(lm_dir), top_k=4, features=layers, pool=pool, feature_dtype=dtype
        ),
        progress=False,
    )
    reader = open_cache(cache)
    specs = reader.teacher("t").meta.features
    assert [(f.layer, f.pool, f.dtype, f.dim) for f in specs] == [
        (li, pool, dtype, 32) for li in layers
    ]
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, features={"t": list(layers)})
        for i, sid in enumerate(data.sample_ids):
            ids = data.inputs["token_ids"][data.offsets[i] : data.offsets[i] + data.lengths[i]]
            with torch.no_grad():
                hidden = lm_model(
                    torch.as_tensor(ids)[None], output_hidden_states=True
                ).hidden_states
            for layer, fname in zip(layers, ("layer_0", "layer_m1"), strict=True):
                ref = hidden[layer][0].numpy()  # (T, D)
                if pool == "mean":
                    ref, got = ref.mean(0, keepdims=True), data.features["t"][fname][i : i + 1]
                else:
                    got = data.features["t"][fname][
                        data.offsets[i] : data.offsets[i] + data.lengths[i]
                    ]
                if dtype == "float16":  # half precision: relative error <= 2^-11
                    tol = np.abs(ref) * 2.0**-11 + 1e-5
                else:  # symmetric int8 per row: error <= scale / 2, scale = max|x| / 127
                    tol = np.abs(ref).max(-1, keepdims=True) / 127 / 2 + 1e-5
                assert got.shape == ref.shape, f"sample {sid} {fname}"
                assert np.all(np.abs(got - ref) <= tol), f"sample {sid} {fname}"


# --- classifiers: a sample grid ---------------------------------------------------------------


def test_sequence_classifier_stores_one_row_per_sample(
    copy_cache: Callable[..., Path],
    inputs_template: Path,
    bert_dir: Path,
    bert_model: BertForSequenceClassification,
) -> None:
    cache = copy_cache(inputs_template)
    meta = run_teacher(
        cache, RunConfig(teacher="bert", model=str(bert_dir), top_k=3), progress=False
    )
    assert (meta.task, meta.grid, meta.vocab_size) == (
        "sequence_classification",
        "sample",
        BERT_LABELS,
    )
    reader = open_cache(cache)
    grid = reader.inputs.grid
    assert zarr.open_array(str(cache / "teachers/bert/indices"), mode="r").shape == (
        grid.num_chunks * grid.chunk_samples,
        3,
    )
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=["bert"])
        block = data.targets["bert"]
        assert len(block.indices) == len(data.sample_ids)
        refs = []
        for i in range(len(data.sample_ids)):
            ids = data.inputs["token_ids"][data.offsets[i] : data.offsets[i] + data.lengths[i]]
            with torch.no_grad():
                refs.append(torch.log_softmax(bert_model(torch.as_tensor(ids)[None]).logits[0], -1))
        check_topk_rows(
            block, torch.stack(refs), value_atol=meta.values.step / 2 + 1e-5, tail_atol=1e-3
        )


def test_image_classifier_on_array_inputs(tmp_path: Path) -> None:
    vit_dir = save_tiny_vit_classifier(tmp_path / "vit", num_labels=5, image_size=16)
    pixels = np.random.default_rng(0).standard_normal((20, 3, 16, 16)).astype(np.float32)
    cache = tmp_path / "cache"
    prepare_arrays(cache, {"pixel_values": pixels}, labels=np.arange(20) % 5, chunk_samples=8)
    meta = run_teacher(
        cache,
        RunConfig(
            teacher="vit",
            model=str(vit_dir),
            top_k=3,
            value_codec="fp32",
            tail_dtype="float32",
            features=(-1,),
        ),
        progress=False,
    )
    assert (meta.task, meta.grid) == ("image_classification", "sample")
    assert [(f.pool, f.dim) for f in meta.features] == [("mean", 32)]
    model = ViTForImageClassification.from_pretrained(vit_dir).eval()
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    reader = open_cache(cache)
    blocks = [
        reader.read_chunk(c, teachers=["vit"], features={"vit": [-1]})
        for c in range(reader.num_chunks)
    ]
    block = TopkBlock(
        *(np.concatenate([getattr(b.targets["vit"], f) for b in blocks]) for f in TopkBlock._fields)
    )
    check_topk_rows(block, torch.log_softmax(out.logits, -1), value_atol=1e-5, tail_atol=1e-5)
    pooled = np.concatenate([b.features["vit"]["layer_m1"] for b in blocks])  # (N, D)
    ref = out.hidden_states[-1].mean(1).numpy()  # mean over patches + CLS
    assert np.all(np.abs(pooled - ref) <= np.abs(ref) * 2.0**-11 + 1e-5)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in blocks]), np.arange(20) % 5)


def test_factory_teacher_on_array_inputs(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(4, 64, size=(20, 6)).astype(np.int64)
    cache = tmp_path / "cache"
    prepare_arrays(cache, {"input_ids": ids}, chunk_samples=8)
    spec = f"{tiny_models.__name__}:tiny_factory_classifier"
    kwargs = {"vocab_size": 64, "num_classes": 4, "seed": 3}
    meta = run_teacher(
        cache,
        RunConfig(teacher="fac", model=spec, top_k=2, value_codec="fp32", tail_dtype="float32"),
        factory_kwargs=kwargs,
        progress=False,
    )
    assert (meta.task, meta.grid, meta.vocab_size, meta.model) == ("custom", "sample", 4, spec)
    with torch.no_grad():
        ref = torch.log_softmax(
            tiny_models.tiny_factory_classifier(**kwargs)(torch.from_numpy(ids)), -1
        )
    reader = open_cache(cache)
    blocks = [
        reader.read_chunk(c, teachers=["fac"]).targets["fac"] for c in range(reader.num_chunks)
    ]
    block = TopkBlock(*(np.concatenate([getattr(b, f) for b in blocks]) for f in TopkBlock._fields))
    check_topk_rows(block, ref, value_atol=FP32_ATOL, tail_atol=FP32_ATOL)


def test_factory_language_model_on_tokens_gets_a_token_grid(
    copy_cache: Callable[..., Path], inputs_template: Path
) -> None:
    cache = copy_cache(inputs_template)
    meta = run_teacher(
        cache,
        RunConfig(teacher="flm", model=f"{tiny_models.__name__}:tiny_factory_lm", top_k=4),
        factory_kwargs={"vocab_size": TOKENIZER_SIZE},
        progress=False,
    )
    reader = open_cache(cache)
    data = reader.read_chunk(0, teachers=["flm"])
    assert meta.grid == "token"
    assert len(data.targets["flm"].indices) == int(data.lengths.sum())
