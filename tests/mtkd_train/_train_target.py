"""What the trainer tests point `mtkd-train` at, and how they read what it wrote.

* ``tiny_image_student``: a ``package.module:function`` student factory for image caches
  (patchify -> linear -> dropout -> head), with hidden states for gate/feature losses and dropout
  for MC-dropout evaluation.
* ``python -m tests.mtkd_train._train_target SECONDS [mtkd-train args]``: the real command line
  with every training batch slowed down by SECONDS, so that a test can signal the process after
  one checkpoint and well before the run ends. The delay sits where the trainer marks a batch as
  consumed (mid-step), so a signal usually arrives inside a step. Nothing else differs.
* ``read_metrics`` / ``step_losses``: the records of ``metrics.jsonl``.
* ``LMCache`` / ``ImageCache`` and the sizes of the session caches that ``conftest.py`` builds.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = 32
"""Tokenizer size and the teachers' LM-head width."""
STUDENT_HEAD = 40
"""The LM student's head is padded past the tokenizer, like real LMs'."""
IMAGE_CLASSES = 4
IMAGE_STUDENT = "tests.mtkd_train._train_target:tiny_image_student"


@dataclass(frozen=True)
class LMCache:
    """A token cache with teachers ``a``, ``b`` (causal LMs) and ``cls`` (sequence classifier)."""

    cache: Path
    student: Path
    """Config-only tiny Llama (1 layer, head of STUDENT_HEAD)."""
    small_student: Path
    """Config-only tiny Llama whose head (16) is narrower than the teachers' vocabulary."""
    deleted_teachers: tuple[Path, ...]
    """Model folders the teachers were cached from; removed after caching."""


@dataclass(frozen=True)
class ImageCache:
    """An array cache of images with two ViT teachers ``v1``, ``v2``."""

    cache: Path
    deleted_teachers: tuple[Path, ...]


@dataclass(frozen=True)
class ImageStudentOutput:
    """HF-style output: ``.logits`` (B, C) and ``.hidden_states`` ((B, D), (B, D))."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None


class TinyImageStudent(torch.nn.Module):
    """Mean of 4x4 patches -> Linear(48, D) -> tanh -> dropout -> Linear(D, C)."""

    task = "image_classification"

    def __init__(self, num_labels: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.num_labels = num_labels
        self.hidden_size = hidden_size
        self.embed = torch.nn.Linear(3 * 4 * 4, hidden_size)
        self.drop = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(hidden_size, num_labels)

    def forward(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False
    ) -> ImageStudentOutput:
        """pixel_values (B, 3, H, W), H and W multiples of 4 -> logits (B, C)."""
        b = pixel_values.shape[0]
        patches = pixel_values.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, H/4, W/4, 4, 4)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(b, -1, 48)  # (B, HW/16, 48)
        hidden = torch.tanh(self.embed(patches)).mean(1)  # (B, D)
        logits = self.head(self.drop(hidden))  # (B, C)
        states = (hidden, hidden) if output_hidden_states else None
        return ImageStudentOutput(logits, states)


def tiny_image_student(
    num_labels: int = 4, hidden_size: int = 16, dropout: float = 0.2
) -> TinyImageStudent:
    """Student factory for ``--student tests.mtkd_train._train_target:tiny_image_student``."""
    return TinyImageStudent(num_labels, hidden_size, dropout)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of ``run/metrics.jsonl`` in file order."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (re-run after a resume) keeps its later value."""
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def _slowed(delay: float) -> None:
    from mtkd_train.data import CachedDistillDataset

    consumed = CachedDistillDataset.consumed

    def slow_consumed(self: CachedDistillDataset, num_batches: int = 1) -> Any:
        time.sleep(delay)
        return consumed(self, num_batches)

    CachedDistillDataset.consumed = slow_consumed  # type: ignore[method-assign]


if __name__ == "__main__":
    from mtkd_train.cli import main

    _slowed(float(sys.argv[1]))
    main(args=sys.argv[2:], prog_name="mtkd-train")
