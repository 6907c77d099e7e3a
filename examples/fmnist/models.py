"""Fashion-MNIST classifiers (teachers and a student), and the saved-teacher folder format.

Every model takes `pixel_values` (B, 1, 28, 28) float in [0, 1] (normalised inside, so callers pass
raw pixels) and returns `ClassifierOutput`: `.logits` (B, 10) and, when `output_hidden_states=True`,
`.hidden_states`, a tuple of (B, D) feature tensors whose last entry is the penultimate features
(conv blocks are summarised by global average pooling so each entry stays small enough to cache).

Teachers (`ARCHITECTURES`), chosen to differ in inductive bias, all a few seconds per epoch on one core:

- ``mlp``: 784-256-128 ReLU MLP, no convolution.
- ``cnn_small``: two 3x3 conv + max-pool blocks (16, 32 channels), a 128-unit dense layer.
- ``cnn_wide``: the same layout twice as wide (32, 64 channels), a 256-unit dense layer, dropout.
- ``cnn_gap``: three conv-BatchNorm blocks (16, 32, 64) with average pooling and a global-average-
  pooling head (no dense hidden layer).

Student: ``student_mlp``, 784-128-10 with dropout after the hidden layer, so MC-dropout can estimate
its uncertainty (put only its `nn.Dropout` modules in train mode at inference).

Specialists: a teacher whose config lists a strict subset of classes is wrapped in
`ClassSubsetClassifier`. It still outputs 10 logits, but those of classes it never saw are the
constant `UNSEEN_LOGIT` (-1e4): its softmax is its distribution over its own classes and gives unseen
classes probability 0 (exactly, in float32). That 0 means "not trained on it", not "not this class":
aggregators must route by the `classes` in its config.json, and logit-matching losses must not use
those entries. Training goes through the same wrapper, so its cross-entropy over the 10 masked logits
is cross-entropy over its own classes only.

A saved teacher is a folder: `model.safetensors` (the state dict of `build_teacher(config)`) and
`config.json` (`TeacherConfig.to_dict`), written last. `load_teacher` reads only these two files, with
`safetensors.torch.load_file`; nothing is unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "ARCHITECTURES",
    "NUM_LABELS",
    "UNSEEN_LOGIT",
    "ClassSubsetClassifier",
    "ClassifierOutput",
    "TeacherConfig",
    "TeacherFormatError",
    "build_student",
    "build_teacher",
    "load_teacher",
    "save_teacher",
]

NUM_LABELS = 10
UNSEEN_LOGIT = -1.0e4
TEACHER_FORMAT = "mtkd-fmnist-teacher"
TEACHER_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Fashion-MNIST train-set pixel mean and std (of values in [0, 1]).
_MEAN, _STD = 0.2860, 0.3530


class TeacherFormatError(ValueError):
    """A saved teacher's config.json is unreadable, of an unknown format version, or invalid."""


@dataclass
class ClassifierOutput:
    """What every model here returns.

    Attributes:
        logits: (B, 10).
        hidden_states: tuple of (B, D_i) features, last = penultimate; None unless asked for.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None


def _normalize(pixel_values: Tensor) -> Tensor:
    return (pixel_values - _MEAN) / _STD


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened image."""

    def __init__(self, hidden: Sequence[int] = (256, 128), num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        widths = [28 * 28, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.head = nn.Linear(widths[-1], num_labels)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ClassifierOutput:
        h = _normalize(pixel_values).flatten(1)  # (B, 784)
        states = []
        for layer in self.layers:
            h = torch.relu(layer(h))  # (B, D_i)
            states.append(h)
        return ClassifierOutput(self.head(h), tuple(states) if output_hidden_states else None)


class ConvPoolCNN(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks, a dense hidden layer, optional dropout before the head."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        hidden: int = 128,
        dropout: float = 0.0,
        num_labels: int = NUM_LABELS,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 7 * 7, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ClassifierOutput:
        x1 = F.max_pool2d(torch.relu(self.conv1(_normalize(pixel_values))), 2)  # (B, c1, 14, 14)
        x2 = F.max_pool2d(torch.relu(self.conv2(x1)), 2)  # (B, c2, 7, 7)
        h = torch.relu(self.fc(x2.flatten(1)))  # (B, hidden)
        logits = self.head(self.dropout(h))
        if not output_hidden_states:
            return ClassifierOutput(logits)
        return ClassifierOutput(logits, (x1.mean((2, 3)), x2.mean((2, 3)), h))


class GapCNN(nn.Module):
    """Conv-BatchNorm-ReLU blocks with 2x2 average pooling between them and a global-average-pool head."""

    def __init__(
        self, channels: Sequence[int] = (16, 32, 64), num_labels: int = NUM_LABELS
    ) -> None:
        super().__init__()
        widths = [1, *channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU())
            for a, b in pairwise(widths)
        )
        self.head = nn.Linear(widths[-1], num_labels)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ClassifierOutput:
        x = _normalize(pixel_values)
        states = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.avg_pool2d(x, 2)  # 28 -> 14 -> 7
            x = block(x)  # (B, C_i, H, W)
            states.append(x.mean((2, 3)))  # (B, C_i)
        return ClassifierOutput(
            self.head(states[-1]), tuple(states) if output_hidden_states else None
        )


class StudentMLP(nn.Module):
    """784-hidden-10 MLP with dropout after the hidden layer (for MC-dropout)."""

    num_labels: int
    hidden_size: int
    task: str

    def __init__(
        self, hidden: int = 128, dropout: float = 0.2, num_labels: int = NUM_LABELS
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, hidden)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_labels)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ClassifierOutput:
        h = torch.relu(self.fc(_normalize(pixel_values).flatten(1)))  # (B, hidden), before dropout
        logits = self.head(self.dropout(h))
        return ClassifierOutput(logits, (h,) if output_hidden_states else None)


class ClassSubsetClassifier(nn.Module):
    """Wraps a classifier so the logits of classes outside `classes` are the constant UNSEEN_LOGIT."""

    unseen: Tensor

    def __init__(
        self, base: nn.Module, classes: Sequence[int], num_labels: int = NUM_LABELS
    ) -> None:
        super().__init__()
        self.base = base
        self.classes = tuple(classes)
        unseen = torch.ones(num_labels, dtype=torch.bool)
        unseen[list(self.classes)] = False
        # Derived from the config, so not saved with the weights.
        self.register_buffer("unseen", unseen, persistent=False)

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> ClassifierOutput:
        out = self.base(pixel_values, output_hidden_states=output_hidden_states)
        return ClassifierOutput(
            out.logits.masked_fill(self.unseen, UNSEEN_LOGIT), out.hidden_states
        )


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn_small": ConvPoolCNN,
    "cnn_wide": lambda **kw: ConvPoolCNN(
        **{"channels": (32, 64), "hidden": 256, "dropout": 0.2, **kw}
    ),
    "cnn_gap": GapCNN,
    "student_mlp": StudentMLP,
}
TEACHER_ARCHITECTURES = ("mlp", "cnn_small", "cnn_wide", "cnn_gap")


@dataclass(frozen=True)
class TeacherConfig:
    """What config.json of a saved teacher holds.

    Attributes:
        name: the teacher's name (its folder's name when written by train_teachers).
        arch: a key of ARCHITECTURES.
        kwargs: keyword arguments for that architecture (JSON values).
        classes: sorted class ids the teacher was trained on; all 10 for a generalist.
        provenance: free-form notes on how it was trained; never read by the loader.
    """

    name: str
    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    classes: tuple[int, ...] = tuple(range(NUM_LABELS))
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_arch(self.arch)
        object.__setattr__(self, "classes", parse_classes(self.classes))

    @property
    def is_specialist(self) -> bool:
        """True when trained on a strict subset of the classes."""
        return len(self.classes) < NUM_LABELS

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the format name and version."""
        return {
            "format": TEACHER_FORMAT,
            "version": TEACHER_FORMAT_VERSION,
            "name": self.name,
            "arch": self.arch,
            "kwargs": dict(self.kwargs),
            "num_labels": NUM_LABELS,
            "classes": list(self.classes),
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeacherConfig:
        """Inverse of `to_dict`; refuses another format or version by name.

        Raises:
            TeacherFormatError: a field is missing or has an unexpected value.
        """
        if data.get("format") != TEACHER_FORMAT or data.get("version") != TEACHER_FORMAT_VERSION:
            raise TeacherFormatError(
                f"format={data.get('format')!r} version={data.get('version')!r}: expected "
                f"{TEACHER_FORMAT!r} version {TEACHER_FORMAT_VERSION}"
            )
        if data.get("num_labels") != NUM_LABELS:
            raise TeacherFormatError(
                f"num_labels={data.get('num_labels')!r}: expected {NUM_LABELS}"
            )
        for key, kind in (("name", str), ("arch", str), ("kwargs", dict), ("classes", list)):
            if not isinstance(data.get(key), kind):
                raise TeacherFormatError(
                    f"{key}={data.get(key)!r}: expected a JSON {kind.__name__}"
                )
        return cls(
            name=data["name"],
            arch=data["arch"],
            kwargs=data["kwargs"],
            classes=tuple(data["classes"]),
            provenance=data.get("provenance", {}),
        )


def parse_arch(arch: str) -> str:
    """Check `arch` names a known architecture."""
    if arch not in ARCHITECTURES:
        raise TeacherFormatError(f"arch={arch!r}: expected one of {sorted(ARCHITECTURES)}")
    return arch


def parse_classes(classes: Sequence[int]) -> tuple[int, ...]:
    """Check `classes` is a non-empty set of distinct class ids in 0..9; return it sorted."""
    ok = all(isinstance(c, int) and 0 <= c < NUM_LABELS for c in classes)
    if not classes or not ok or len(set(classes)) != len(classes):
        raise TeacherFormatError(
            f"classes={list(classes)!r}: expected distinct integers in 0..{NUM_LABELS - 1}, at least one"
        )
    return tuple(sorted(classes))


def build_teacher(config: TeacherConfig) -> nn.Module:
    """Build an untrained teacher; specialists come wrapped in ClassSubsetClassifier."""
    model = ARCHITECTURES[config.arch](**config.kwargs)
    model = ClassSubsetClassifier(model, config.classes) if config.is_specialist else model
    model.num_labels = NUM_LABELS  # type: ignore[assignment]  # tells mtkd how many classes to trust
    return model


def build_student(**kwargs: Any) -> nn.Module:
    """The student: `StudentMLP(hidden=128, dropout=0.2)`; kwargs override those defaults."""
    model = StudentMLP(**kwargs)
    model.num_labels = model.head.out_features  # read by mtkd-train (output size)
    model.hidden_size = model.fc.out_features  # read by mtkd-train (gate / feature projections)
    model.task = "image_classification"
    return model


def save_teacher(model: nn.Module, config: TeacherConfig, path: str | Path) -> None:
    """Write `model` (built by `build_teacher(config)`) as a teacher folder; config.json goes last.

    Raises:
        FileExistsError: `path` already holds a config.json.
    """
    folder = Path(path)
    if (folder / CONFIG_FILE).exists():
        raise FileExistsError(
            f"{folder / CONFIG_FILE} exists; remove the folder to save a teacher there"
        )
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": TEACHER_FORMAT})
    (folder / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def read_teacher_config(path: str | Path) -> TeacherConfig:
    """Read and validate a teacher folder's config.json.

    Raises:
        FileNotFoundError: no config.json there.
        TeacherFormatError: it is not valid JSON or not a teacher config of a known version.
    """
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: a teacher folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
            "(written by `python -m examples.fmnist.train_teachers`)"
        )
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise TeacherFormatError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise TeacherFormatError(
            f"{config_path}: expected a JSON object, found {type(data).__name__}"
        )
    try:
        return TeacherConfig.from_dict(data)
    except TeacherFormatError as err:
        raise TeacherFormatError(f"{config_path}: {err}") from err


def load_teacher(path: str) -> nn.Module:
    """Load a saved teacher folder, in eval mode (the factory for `...fmnist_models:load_teacher`).

    Args:
        path: folder holding config.json and model.safetensors.

    Returns:
        The module; `forward(pixel_values (B, 1, 28, 28), output_hidden_states)` -> ClassifierOutput.

    Raises:
        FileNotFoundError: a file is missing.
        TeacherFormatError: the config is invalid or the weights do not fit its architecture.
    """
    config = read_teacher_config(path)
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the teacher folder is incomplete")
    model = build_teacher(config)
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise TeacherFormatError(
            f"{weights} does not fit arch={config.arch!r} kwargs={config.kwargs}: {err}"
        ) from err
    return model.eval()
