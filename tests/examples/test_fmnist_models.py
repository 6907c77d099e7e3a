"""Fashion-MNIST benchmark models, teacher folders and data split (benchmarks/quality)."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# `benchmarks` is not an installed package: make the repository root importable under plain `pytest`
# too (it is already with `python -m pytest` from the root).
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples.fmnist import data as fmnist_data  # noqa: E402
from examples.fmnist.models import (  # noqa: E402
    ARCHITECTURES,
    UNSEEN_LOGIT,
    TeacherConfig,
    TeacherFormatError,
    build_student,
    build_teacher,
    load_teacher,
    save_teacher,
)


def _have_fmnist() -> bool:
    try:
        fmnist_data.find_fmnist_dir()
    except fmnist_data.FmnistNotFoundError:
        return False
    return True


needs_fmnist = pytest.mark.skipif(
    not _have_fmnist(), reason="needs `apt-get install dataset-fashion-mnist`"
)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_forward_shapes_and_penultimate_features(arch: str) -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch]().eval()
    x = torch.rand(3, 1, 28, 28)
    plain = model(x)
    out = model(x, output_hidden_states=True)
    assert plain.logits.shape == (3, 10) and plain.hidden_states is None
    assert torch.equal(plain.logits, out.logits)
    assert out.hidden_states and all(h.shape[0] == 3 and h.dim() == 2 for h in out.hidden_states)
    # The last hidden state feeds the head (through dropout, which is off in eval mode).
    head = model.get_submodule("head")
    assert torch.allclose(head(out.hidden_states[-1]), out.logits, atol=1e-5)


@pytest.mark.parametrize("classes", [tuple(range(10)), (0, 2, 4, 6, 8)])
@pytest.mark.parametrize("arch", ["mlp", "cnn_small", "cnn_wide", "cnn_gap"])
def test_save_load_round_trip_gives_identical_logits(
    tmp_path: Path, arch: str, classes: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    config = TeacherConfig(name="t", arch=arch, classes=classes)
    model = build_teacher(config)
    with torch.no_grad():  # move BatchNorm running stats off their init so they must be saved
        for name, buf in model.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    save_teacher(model, config, tmp_path / "t")
    loaded = load_teacher(str(tmp_path / "t"))
    x = torch.rand(4, 1, 28, 28)
    assert not loaded.training
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)
    assert json.loads((tmp_path / "t" / "config.json").read_text())["classes"] == list(classes)


def test_specialist_masks_unseen_classes_to_zero_probability() -> None:
    model = build_teacher(TeacherConfig(name="s", arch="mlp", classes=(1, 3))).eval()
    logits = model(torch.rand(5, 1, 28, 28)).logits
    unseen = [c for c in range(10) if c != 1 and c != 3]
    assert torch.all(logits[:, unseen] == UNSEEN_LOGIT)
    probs = logits.softmax(-1)
    assert torch.all(probs[:, unseen] == 0)
    assert torch.allclose(probs[:, [1, 3]].sum(-1), torch.ones(5))


def test_config_round_trip_and_refusals(tmp_path: Path) -> None:
    config = TeacherConfig(name="c", arch="cnn_small", kwargs={"hidden": 64}, classes=(3, 1, 2))
    assert config.classes == (1, 2, 3)
    assert TeacherConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TeacherFormatError, match="version"):
        TeacherConfig.from_dict({**config.to_dict(), "version": 99})
    with pytest.raises(TeacherFormatError, match="arch='resnet'"):
        TeacherConfig(name="c", arch="resnet")
    with pytest.raises(TeacherFormatError, match="classes"):
        TeacherConfig(name="c", arch="mlp", classes=(1, 1))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_teacher(str(tmp_path))
    save_teacher(build_teacher(config), config, tmp_path / "c")
    data = json.loads((tmp_path / "c" / "config.json").read_text())
    (tmp_path / "c" / "config.json").write_text(json.dumps({**data, "kwargs": {"hidden": 32}}))
    with pytest.raises(TeacherFormatError, match="does not fit"):
        load_teacher(str(tmp_path / "c"))


def test_student_dropout_is_stochastic_in_train_mode_only() -> None:
    torch.manual_seed(0)
    student = build_student(hidden=128, dropout=0.5)
    x = torch.rand(2, 1, 28, 28)
    student.train()
    assert not torch.equal(student(x).logits, student(x).logits)
    student.eval()
    assert torch.equal(student(x).logits, student(x).logits)
    assert student(x, output_hidden_states=True).hidden_states[-1].shape == (2, 128)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_parsing_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTKD_FMNIST_DIR", str(tmp_path))
    with pytest.raises(fmnist_data.FmnistNotFoundError, match="apt-get install"):
        fmnist_data.load_fmnist("test")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    got_images, got_labels = fmnist_data.load_fmnist("test")
    assert got_images.dtype == np.uint8 and np.array_equal(got_images, images)
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", images)  # 3 dims where 1 is expected
    with pytest.raises(fmnist_data.IdxFormatError, match="1 dimensions"):
        fmnist_data.load_fmnist("test")


@needs_fmnist
def test_real_split_is_fixed_disjoint_and_stratified() -> None:
    images, labels = fmnist_data.load_fmnist("train")
    assert images.shape == (60_000, 28, 28) and labels.shape == (60_000,)
    split = fmnist_data.fmnist_split(labels)
    assert split.sizes() == {"teacher_train": 25_000, "transfer": 30_000, "val": 5_000}
    everything = np.concatenate([split.teacher_train, split.transfer, split.val])
    assert np.unique(everything).size == 60_000
    assert np.array_equal(np.bincount(labels[split.val]), np.full(10, 500))
    assert np.array_equal(fmnist_data.fmnist_split(labels).transfer, split.transfer)
    a = fmnist_data.transfer_split(0, labels=labels)
    b = fmnist_data.transfer_split(1, labels=labels)
    assert np.array_equal(np.bincount(labels[a.labelled]), np.full(10, 100))
    assert np.isin(a.labelled, split.transfer).all() and a.unlabelled.size == 29_000
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.labelled, b.labelled)
    assert np.array_equal(fmnist_data.transfer_split(0, labels=labels).labelled, a.labelled)
