"""`load_student` / `save_student`: HF folders and factories, built, run and saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtkd_train.student import StudentError, load_student, save_student
from tests.mtkd_train._train_target import IMAGE_STUDENT, STUDENT_HEAD, LMCache


def _tokens() -> dict[str, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


def test_config_only_folder_is_initialised_from_the_seed(lm_cache: LMCache) -> None:
    s = load_student(str(lm_cache.student), seed=1)
    assert (s.task, s.output_size) == ("causal_lm", STUDENT_HEAD)
    again = load_student(str(lm_cache.student), seed=1).module.state_dict()
    other = load_student(str(lm_cache.student), seed=2).module.state_dict()
    w = "model.embed_tokens.weight"
    assert torch.equal(s.module.state_dict()[w], again[w])
    assert not torch.equal(s.module.state_dict()[w], other[w])


def test_forward_shapes_and_hidden_states(lm_cache: LMCache) -> None:
    s = load_student(str(lm_cache.student))
    logits, hidden = s.forward(_tokens(), want_hidden=-1)
    assert logits.shape == (2, 4, STUDENT_HEAD)
    assert hidden is not None and hidden.shape == (2, 4, 32)
    assert s.forward(_tokens())[1] is None


def test_hf_student_round_trip(lm_cache: LMCache, tmp_path: Path) -> None:
    s = load_student(str(lm_cache.student), seed=3)
    with torch.no_grad():
        s.module.lm_head.weight.mul_(2.0)  # a change a re-initialisation would not reproduce
    path = save_student(s, tmp_path / "saved")
    assert any(path.glob("*.safetensors")) and not (path / "factory.json").exists()
    back = load_student(str(path), seed=99)  # weights present: loaded, not initialised
    s.module.eval()
    back.module.eval()
    with torch.no_grad():
        assert torch.equal(back.forward(_tokens())[0], s.forward(_tokens())[0])


def test_factory_student_round_trip(tmp_path: Path) -> None:
    s = load_student(IMAGE_STUDENT, {"num_labels": 3, "hidden_size": 8}, seed=0)
    assert (s.task, s.output_size) == ("image_classification", 3)
    x = {"pixel_values": torch.randn(5, 3, 16, 16), "labels": torch.zeros(5, dtype=torch.long)}
    s.module.eval()
    logits, hidden = s.forward(x, want_hidden=-1)
    assert logits.shape == (5, 1, 3)
    assert hidden is not None and hidden.shape == (5, 1, 8)
    path = save_student(s, tmp_path / "saved")
    assert json.loads((path / "factory.json").read_text()) == {
        "spec": IMAGE_STUDENT,
        "kwargs": {"num_labels": 3, "hidden_size": 8},
    }
    back = load_student(str(path), seed=123, trust_factory=True)
    back.module.eval()
    assert torch.equal(back.forward(x)[0], logits)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("no/such/folder", "neither a folder"),
        ("tests.mtkd_train._train_target:nope", "cannot import 'nope'"),
        ("no_such_module_xyz:make", "no_such_module_xyz"),
        ("tests.mtkd_train._train_target:read_metrics", "expected a torch.nn.Module"),
    ],
)
def test_bad_student_spec_is_named(spec: str, needle: str, tmp_path: Path) -> None:
    kwargs = {"run": tmp_path} if spec.endswith("read_metrics") else {}
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(StudentError, match=needle) as e:
        load_student(spec, kwargs)
    assert spec in str(e.value)


def test_folder_without_known_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaModel"]})
    )
    with pytest.raises(StudentError, match="architectures"):
        load_student(str(tmp_path))
