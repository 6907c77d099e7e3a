"""Fashion-MNIST from Debian's `dataset-fashion-mnist`, parsed from IDX with numpy, and its fixed split.

Data: `apt-get install dataset-fashion-mnist` puts four gzipped IDX files under
`/usr/share/datasets/fashion-mnist` (60,000 train and 10,000 test images, 28x28 uint8, 10 balanced
classes). `MTKD_FMNIST_DIR` overrides that folder. Parsing reads the IDX header (magic number, then one
big-endian int32 per dimension) and maps the payload with `np.frombuffer`: no torchvision. Cost: one
gunzip of ~30 MB, about half a second for the train split.

The split of the 60,000 training images is fixed (seed `SPLIT_SEED`, independent of any experiment
seed) and stratified: each class has exactly 6,000 training images, and each is cut the same way:

=================  =========  =========  ==================================================
part               per class  total      what for
=================  =========  =========  ==================================================
``teacher_train``  2,500      25,000     training the teachers, and nothing else
``transfer``       3,000      30,000     the transfer set: the student sees every teacher's
                                         soft labels for all of it, and hard labels only for
                                         a small labelled subset (`transfer_split`)
``val``            500        5,000      model selection (students; teacher reports)
=================  =========  =========  ==================================================

The three parts are disjoint, so teachers' soft labels on the transfer set are outputs on images
they never trained on. The 10,000-image ``test`` split is for final reporting only.

`transfer_split(seed, n_labelled)` draws the labelled subset of the transfer set: stratified,
`n_labelled // 10` per class with the remainder going one each to the lowest classes, and it varies
with `seed` while the three-way split above does not. Indices throughout are row numbers into
`load_fmnist("train")`.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_DIR",
    "SPLIT_SEED",
    "FmnistNotFoundError",
    "FmnistSplit",
    "IdxFormatError",
    "TransferSplit",
    "find_fmnist_dir",
    "fmnist_split",
    "load_fmnist",
    "pixel_values",
    "transfer_split",
]

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "MTKD_FMNIST_DIR"
SPLIT_SEED = 20_240_601
NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_PER_CLASS = {"teacher_train": 2_500, "transfer": 3_000, "val": 500}
_IDX_UBYTE = 0x08


class FmnistNotFoundError(FileNotFoundError):
    """The Fashion-MNIST IDX files are not installed where we look."""


class IdxFormatError(ValueError):
    """A file is not the IDX file it is named as (bad magic number, type, shape or length)."""


def find_fmnist_dir() -> Path:
    """Return the folder that holds the four Fashion-MNIST IDX files (gzipped or not).

    Looks in `$MTKD_FMNIST_DIR` if set, else in `/usr/share/datasets/fashion-mnist`.

    Raises:
        FmnistNotFoundError: a file is missing; the message names it and the install command.
    """
    env = os.environ.get(ENV_VAR)
    folder = Path(env) if env else DEFAULT_DIR
    missing = [name for pair in _FILES.values() for name in pair if _idx_path(folder, name) is None]
    if missing:
        source = f"${ENV_VAR}={env}" if env else f"{DEFAULT_DIR} (set ${ENV_VAR} to look elsewhere)"
        raise FmnistNotFoundError(
            f"Fashion-MNIST not found in {source}: missing {', '.join(missing)} (.gz or plain). "
            "Install it with `apt-get update && apt-get install -y dataset-fashion-mnist`."
        )
    return folder


def load_fmnist(split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """Load one official split.

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).

    Returns:
        images: uint8 array (N, 28, 28), read-only.
        labels: int64 array (N,), values in 0..9.

    Raises:
        ValueError: `split` is neither "train" nor "test".
        FmnistNotFoundError: the files are not installed.
        IdxFormatError: a file is malformed or images and labels disagree in count.
    """
    if split not in _FILES:
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    folder = find_fmnist_dir()
    image_name, label_name = _FILES[split]
    images = _read_idx(_idx_path(folder, image_name), ndim=3)  # type: ignore[arg-type]
    labels = _read_idx(_idx_path(folder, label_name), ndim=1)  # type: ignore[arg-type]
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise IdxFormatError(
            f"{split}: images have shape {images.shape} and labels {labels.shape}; "
            "expected (N, 28, 28) and (N,) with the same N"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise IdxFormatError(f"{split}: label {int(labels.max())} found; expected 0..9")
    return images, labels.astype(np.int64)


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """Turn uint8 images (N, 28, 28) into the models' input: float32 (N, 1, 28, 28) in [0, 1]."""
    # astype copies, so the tensor owns writable memory (the loaded arrays are read-only).
    return torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)


@dataclass(frozen=True)
class FmnistSplit:
    """The fixed split of the train set; each field holds sorted row indices into it."""

    teacher_train: np.ndarray
    transfer: np.ndarray
    val: np.ndarray

    def sizes(self) -> dict[str, int]:
        """Number of rows in each part, for reports."""
        return {name: int(getattr(self, name).size) for name in _PER_CLASS}


@dataclass(frozen=True)
class TransferSplit:
    """The transfer set and the labelled subset drawn from it (row indices into the train set).

    Attributes:
        indices: every transfer row, sorted (30,000).
        labelled: the rows whose hard label the student may use, sorted (`n_labelled`).
        unlabelled: the other transfer rows, sorted; only soft labels for these.
        seed: the seed that drew `labelled`.
    """

    indices: np.ndarray
    labelled: np.ndarray
    unlabelled: np.ndarray
    seed: int


def fmnist_split(labels: np.ndarray | None = None) -> FmnistSplit:
    """Return the fixed, stratified split described in the module docstring.

    Args:
        labels: the train labels (60,000,); loaded from disk when not given.

    Raises:
        ValueError: a class has fewer than the 6,000 images the split needs.
    """
    if labels is None:
        labels = load_fmnist("train")[1]
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _PER_CLASS}
    need = sum(_PER_CLASS.values())
    for c in range(NUM_CLASSES):
        rows = np.flatnonzero(labels == c)
        if rows.size < need:
            raise ValueError(f"class {c} has {rows.size} train images; the split needs {need}")
        rows = rng.permutation(rows)
        start = 0
        for name, count in _PER_CLASS.items():
            parts[name].append(rows[start : start + count])
            start += count
    return FmnistSplit(**{name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()})


def transfer_split(
    seed: int, n_labelled: int = 1000, labels: np.ndarray | None = None
) -> TransferSplit:
    """Draw the labelled subset of the transfer set, stratified by class.

    Args:
        seed: seeds the draw; the transfer set itself does not depend on it.
        n_labelled: how many transfer rows keep their hard label, 0..30,000.
        labels: the train labels (60,000,); loaded from disk when not given.

    Returns:
        The transfer rows split into labelled and unlabelled.

    Raises:
        ValueError: `n_labelled` is out of range.
    """
    if labels is None:
        labels = load_fmnist("train")[1]
    transfer = fmnist_split(labels).transfer
    if not 0 <= n_labelled <= transfer.size:
        raise ValueError(f"n_labelled={n_labelled}: expected an integer in 0..{transfer.size}")
    rng = np.random.default_rng([SPLIT_SEED, seed])
    chosen = []
    for c in range(NUM_CLASSES):
        count = n_labelled // NUM_CLASSES + (1 if c < n_labelled % NUM_CLASSES else 0)
        rows = transfer[labels[transfer] == c]
        chosen.append(rng.choice(rows, size=count, replace=False))
    labelled = np.sort(np.concatenate(chosen))
    unlabelled = np.setdiff1d(transfer, labelled, assume_unique=True)
    return TransferSplit(indices=transfer, labelled=labelled, unlabelled=unlabelled, seed=seed)


def _idx_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file: 2 zero bytes, type 0x08, ndim, then ndim big-endian int32."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise IdxFormatError(
            f"{path}: header {data[:4].hex()} is not an unsigned-byte IDX file with {ndim} "
            f"dimensions (expected 0000{_IDX_UBYTE:02x}{ndim:02x}); reinstall dataset-fashion-mnist"
        )
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IdxFormatError(
            f"{path}: {len(data)} bytes, expected {expected} for shape {shape}; the file is truncated"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
