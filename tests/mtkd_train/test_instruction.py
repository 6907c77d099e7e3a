"""Instruction data in the trainer: KD and CE only where the loss mask allows; assistant-token perplexity."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers.chat_data import conversations, save_chat_tokenizer, write_jsonl
from helpers.tiny_models import save_tiny_causal_lm

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.data import CachedDistillDataset
from mtkd_train.evaluate import eval_batches, evaluate_student
from mtkd_train.objective import Objective
from mtkd_train.recipe import DistillRecipe
from mtkd_train.rows import loss_rows, row_labels, to_device
from mtkd_train.student import load_student

VOCAB = 128


@pytest.fixture(scope="module")
def chat_cache(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("instr")
    teacher = save_tiny_causal_lm(root / "teacher", vocab_size=VOCAB, with_tokenizer=False, seed=1)
    save_chat_tokenizer(teacher, size=VOCAB - 8)
    student = save_tiny_causal_lm(root / "student", vocab_size=VOCAB, num_layers=1, with_tokenizer=False, seed=4)
    for w in student.glob("*.safetensors"):
        w.unlink()  # initialised from config, as a user would start one
    data = write_jsonl(root / "chat.jsonl", [{"messages": c} for c in conversations(12)])
    prepare(root / "cache", data, tokenizer=teacher, max_length=48, messages_column="messages", chunk_samples=4,
            progress=False)
    run_teacher(root / "cache", RunConfig(teacher="t", model=str(teacher), top_k=8), progress=False)
    return {"cache": root / "cache", "student": student, "root": root}


def _batch(cache: Path) -> dict[str, Any]:
    return next(iter(CachedDistillDataset(cache, ["t"], batch_size=6, shuffle=False)))


def test_rows_and_labels_follow_the_mask(chat_cache) -> None:  # noqa: ANN001
    batch = _batch(chat_cache["cache"])
    mask, real, ids = batch["loss_mask"], batch["position_mask"], batch["input_ids"]
    assert mask.shape == ids.shape and mask.any() and (mask <= real).all()
    rows, labels = loss_rows(batch), row_labels(batch, "causal_lm")
    want = torch.zeros_like(mask)
    want[:, :-1] = mask[:, 1:] & real[:, 1:]
    assert torch.equal(rows, want)
    assert torch.equal(labels != -100, want)
    assert torch.equal(labels[want], ids[:, 1:][want[:, :-1]])
    assert len(to_device(batch, torch.device("cpu"), per_token=True)["row_index"]) == int(want.sum())


def test_kd_and_ce_ignore_rows_outside_the_mask(chat_cache) -> None:  # noqa: ANN001
    batch = _batch(chat_cache["cache"])
    obj = Objective(teachers=["t"], capture_temperatures=[1.0], vocab_size=VOCAB, aggregate="mean",
                    aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket", alpha=0.5, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*batch["input_ids"].shape, VOCAB, generator=g)
    base = obj(batch, z, None, "causal_lm")
    rows = loss_rows(batch)
    off = batch["position_mask"] & ~rows
    z_off = z + 5 * torch.randn(z.shape, generator=g) * off.unsqueeze(-1)
    moved_off = obj(batch, z_off, None, "causal_lm")
    for k in ("kd", "ce", "loss"):
        assert torch.allclose(moved_off[k], base[k], atol=1e-6), k
    z_on = z + 5 * torch.randn(z.shape, generator=g) * rows.unsqueeze(-1)
    moved_on = obj(batch, z_on, None, "causal_lm")
    assert abs(float(moved_on["kd"] - base["kd"])) > 1e-3 and abs(float(moved_on["ce"] - base["ce"])) > 1e-3
    # CE equals cross-entropy over the assistant rows only
    ce = F.cross_entropy(z[rows], row_labels(batch, "causal_lm")[rows])
    assert torch.allclose(base["ce"], ce, atol=1e-5)


def test_training_and_assistant_token_perplexity(chat_cache, tmp_path: Path) -> None:  # noqa: ANN001
    cfg = TrainConfig(cache=str(chat_cache["cache"]), teachers=("t",), student=str(chat_cache["student"]),
                      out=str(tmp_path), batch_size=4, max_steps=2, checkpoint_every=100, lr=3e-3, warmup_steps=0,
                      aggregate="mean", num_workers=0, progress=False)
    recipe = DistillRecipe(cfg).setup()
    losses = recipe.train()
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    student = load_student(str(chat_cache["student"]), seed=0)
    reader = open_cache(chat_cache["cache"])
    res = evaluate_student(student, reader, batch_size=5)
    assert res["scored"] == "loss_mask"
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(reader, 5):
            y = row_labels(batch, "causal_lm")
            logits = student.forward(batch)[0]
            keep = y != -100
            nll += float(F.cross_entropy(logits[keep].float(), y[keep], reduction="sum"))
            n += int(keep.sum())
    marked = sum(int(reader.sample(i)["loss_mask"][1:].sum()) for i in range(reader.inputs.num_samples))
    assert res["positions"] == n == marked < reader.inputs.num_positions - reader.inputs.num_samples
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
