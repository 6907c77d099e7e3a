"""Tests for mtkd_cache.precompute.models (teacher loading and forward) and mtkd_cache.precompute.device.

Teachers are tiny real models saved with ``save_pretrained`` and loaded back through
``from_pretrained``; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from helpers import tiny_models
from helpers.tiny_models import (
    LM_HEAD_PADDING,
    save_tiny_bert_classifier,
    save_tiny_causal_lm,
    save_tiny_vit_classifier,
)
from transformers import (
    BertForSequenceClassification,
    LlamaForCausalLM,
    ViTForImageClassification,
)

from mtkd_cache.precompute.device import (
    DeviceError,
    DtypeError,
    autocast_context,
    resolve_device,
    resolve_dtype,
)
from mtkd_cache.precompute.forward import forward_teacher
from mtkd_cache.precompute.models import (
    LoadedTeacher,
    TeacherLoadError,
    UnsupportedTeacherError,
    load_teacher,
)

CPU = torch.device("cpu")
FACTORY_LM = f"{tiny_models.__name__}:tiny_factory_lm"
FACTORY_CLASSIFIER = f"{tiny_models.__name__}:tiny_factory_classifier"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert_classifier(tmp_path_factory.mktemp("bert"), num_labels=3)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_vit_classifier(tmp_path_factory.mktemp("vit"), num_labels=5)


def _token_batch(vocab: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(4, vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = 0
    input_ids[1, 4:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _assert_frozen(teacher: LoadedTeacher) -> None:
    assert not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())


# --- Hugging Face folders ----------------------------------------------------------------------


def test_load_causal_lm_metadata(llama_dir: Path) -> None:
    teacher = load_teacher(str(llama_dir), device=CPU, dtype=torch.float32)

    assert teacher.task == "causal_lm"
    assert isinstance(teacher.module, LlamaForCausalLM)
    assert teacher.padded_vocab_size == 128
    assert teacher.vocab_size == 128 - LM_HEAD_PADDING  # from the tokenizer, not the head
    assert (teacher.num_layers, teacher.hidden_size) == (2, 32)
    assert teacher.tokenizer_path == str(llama_dir)
    assert teacher.model_id == str(llama_dir) and teacher.revision is None
    assert len(teacher.weights_hash) == 64 and int(teacher.weights_hash, 16) >= 0
    _assert_frozen(teacher)


def test_causal_lm_forward_matches_model_and_returns_hidden_states(llama_dir: Path) -> None:
    teacher = load_teacher(str(llama_dir), device=CPU, dtype=torch.float32)
    batch = _token_batch(120)
    logits, hidden = forward_teacher(teacher, batch, want_hidden=True)

    reference = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        expected = reference(**batch).logits
    assert logits.shape == (2, 6, 128)
    torch.testing.assert_close(logits, expected)
    assert hidden is not None and len(hidden) == 3  # embeddings + 2 layers
    assert all(h.shape == (2, 6, 32) for h in hidden)
    no_hidden = forward_teacher(teacher, batch, want_hidden=False)
    assert no_hidden[1] is None
    torch.testing.assert_close(no_hidden[0], expected)


def test_requested_layers_only_are_kept(llama_dir: Path) -> None:
    """Asking for layers (0, -1) keeps only those: the middle layer's activations are never returned."""
    teacher = load_teacher(str(llama_dir), device=CPU, dtype=torch.float32)
    batch = _token_batch(120)
    _, every = forward_teacher(teacher, batch, want_hidden=True)
    _, some = forward_teacher(teacher, batch, want_hidden=(0, -1))
    assert every is not None and some is not None and len(some) == len(every) == 3
    assert some[1] is None and every[1] is not None
    torch.testing.assert_close(some[0], every[0])
    torch.testing.assert_close(some[-1], every[-1])


def test_weights_hash_is_stable_and_follows_content(llama_dir: Path, tmp_path: Path) -> None:
    first = load_teacher(str(llama_dir), device=CPU, dtype=torch.float32).weights_hash
    second = load_teacher(str(llama_dir), device=CPU, dtype=torch.bfloat16).weights_hash
    same_weights = save_tiny_causal_lm(tmp_path / "copy", seed=0)
    other_weights = save_tiny_causal_lm(tmp_path / "other", seed=1)

    assert first == second  # the files are hashed, not the in-memory dtype
    assert load_teacher(str(same_weights), device=CPU, dtype=torch.float32).weights_hash == first
    assert load_teacher(str(other_weights), device=CPU, dtype=torch.float32).weights_hash != first


def test_bfloat16_load_runs_in_bfloat16(llama_dir: Path) -> None:
    teacher = load_teacher(str(llama_dir), device=CPU, dtype=torch.bfloat16)
    assert {p.dtype for p in teacher.module.parameters()} == {torch.bfloat16}
    logits, _ = forward_teacher(teacher, _token_batch(120), want_hidden=False)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_causal_lm_without_tokenizer_trusts_the_head_width(tmp_path: Path) -> None:
    folder = save_tiny_causal_lm(tmp_path / "lm", vocab_size=96, with_tokenizer=False)
    teacher = load_teacher(str(folder), device=CPU, dtype=torch.float32)
    assert teacher.vocab_size == teacher.padded_vocab_size == 96
    assert teacher.tokenizer_path is None


def test_load_sequence_classifier(bert_dir: Path) -> None:
    teacher = load_teacher(str(bert_dir), device=CPU, dtype=torch.float32)
    batch = _token_batch(64)
    logits, hidden = forward_teacher(teacher, batch, want_hidden=True)

    reference = BertForSequenceClassification.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        expected = reference(**batch).logits
    assert teacher.task == "sequence_classification"
    assert teacher.vocab_size == teacher.padded_vocab_size == 3
    assert teacher.tokenizer_path == str(bert_dir)
    assert logits.shape == (2, 1, 3)
    torch.testing.assert_close(logits[:, 0], expected)
    assert hidden is not None and len(hidden) == 3
    _assert_frozen(teacher)


def test_load_image_classifier(vit_dir: Path) -> None:
    teacher = load_teacher(str(vit_dir), device=CPU, dtype=torch.float32)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    logits, hidden = forward_teacher(teacher, {"pixel_values": pixels.double()}, want_hidden=True)

    reference = ViTForImageClassification.from_pretrained(vit_dir).eval()
    with torch.no_grad():
        expected = reference(pixel_values=pixels).logits
    assert teacher.task == "image_classification"
    assert teacher.vocab_size == teacher.padded_vocab_size == 5
    assert teacher.tokenizer_path is None
    assert logits.shape == (2, 1, 5)
    torch.testing.assert_close(logits[:, 0], expected)  # float64 pixels were cast to the model
    assert hidden is not None and len(hidden) == 3 and hidden[-1].shape == (2, 17, 32)


# --- factories ---------------------------------------------------------------------------------


def test_factory_teacher_loads_forwards_and_hashes_state_dict() -> None:
    teacher = load_teacher(
        FACTORY_LM, device=CPU, dtype=torch.float32, factory_kwargs={"vocab_size": 40}
    )
    batch = _token_batch(40)
    logits, hidden = forward_teacher(teacher, batch, want_hidden=True)

    assert teacher.task == "custom" and teacher.model_id == FACTORY_LM
    assert teacher.vocab_size == teacher.padded_vocab_size == 40
    assert (teacher.num_layers, teacher.hidden_size) == (1, 16)
    expected = tiny_models.tiny_factory_lm(vocab_size=40)(batch["input_ids"]).logits
    torch.testing.assert_close(logits, expected)
    assert hidden is not None and len(hidden) == 2
    _assert_frozen(teacher)

    again = load_teacher(
        FACTORY_LM, device=CPU, dtype=torch.float32, factory_kwargs={"vocab_size": 40}
    )
    other = load_teacher(
        FACTORY_LM, device=CPU, dtype=torch.float32, factory_kwargs={"vocab_size": 40, "seed": 1}
    )
    assert again.weights_hash == teacher.weights_hash
    assert other.weights_hash != teacher.weights_hash


def test_factory_classifier_gives_one_row_and_refuses_hidden_states() -> None:
    teacher = load_teacher(FACTORY_CLASSIFIER, device=CPU, dtype=torch.float32)
    logits, _ = forward_teacher(teacher, _token_batch(50), want_hidden=False)
    assert teacher.vocab_size == 4 and logits.shape == (2, 1, 4)
    with pytest.raises(UnsupportedTeacherError, match="output_hidden_states"):
        forward_teacher(teacher, _token_batch(50), want_hidden=True)


def test_missing_factory_function_is_a_load_error() -> None:
    with pytest.raises(TeacherLoadError, match="no callable 'nope'"):
        load_teacher(f"{tiny_models.__name__}:nope", device=CPU, dtype=torch.float32)


# --- errors ------------------------------------------------------------------------------------


def test_unknown_path_raises_file_not_found_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-teacher"
    with pytest.raises(TeacherLoadError, match="does not exist") as info:
        load_teacher(str(missing), device=CPU, dtype=torch.float32)
    assert isinstance(info.value, FileNotFoundError)
    assert str(missing) in str(info.value)


def test_hub_id_offline_fails_with_a_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherLoadError, match="could not be fetched"):
        load_teacher("mtkd-tests/not-a-model", device=CPU, dtype=torch.float32)


def test_folder_without_weights_cannot_be_fingerprinted(llama_dir: Path, tmp_path: Path) -> None:
    shutil.copy(llama_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(TeacherLoadError, match="no \\*.safetensors"):
        load_teacher(str(tmp_path), device=CPU, dtype=torch.float32)


def _folder_with_config(llama_dir: Path, tmp_path: Path, **changes: object) -> Path:
    config = json.loads((llama_dir / "config.json").read_text())
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(llama_dir / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


def test_unknown_architecture_is_unsupported(llama_dir: Path, tmp_path: Path) -> None:
    folder = _folder_with_config(llama_dir, tmp_path, architectures=["LlamaForSomethingElse"])
    with pytest.raises(UnsupportedTeacherError, match="LlamaForSomethingElse"):
        load_teacher(str(folder), device=CPU, dtype=torch.float32)


def test_base_model_without_head_loads_as_a_feature_only_encoder(llama_dir: Path, tmp_path: Path) -> None:
    folder = _folder_with_config(llama_dir, tmp_path, architectures=["LlamaModel"])
    teacher = load_teacher(str(folder), device=CPU, dtype=torch.float32)
    assert teacher.task == "encoder" and type(teacher.module).__name__ == "LlamaModel"
    assert teacher.num_layers == 2 and teacher.hidden_size is not None


def test_remote_code_is_refused_unless_trusted(llama_dir: Path, tmp_path: Path) -> None:
    folder = _folder_with_config(
        llama_dir,
        tmp_path,
        model_type="mtkd-custom",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )
    with pytest.raises(UnsupportedTeacherError, match="--trust-remote-code"):
        load_teacher(str(folder), device=CPU, dtype=torch.float32)


# --- devices -----------------------------------------------------------------------------------


def test_resolve_device_and_dtype_on_cpu() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("bf16", CPU) == torch.bfloat16
    assert resolve_dtype("fp16", CPU) == torch.float16
    with pytest.raises(DtypeError, match="'int8'"):
        resolve_dtype("int8", CPU)
    with pytest.raises(DeviceError, match="'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    assert resolve_device("auto") == CPU
    with pytest.raises(DeviceError, match="CUDA is not available.*--device cpu"):
        resolve_device("cuda:1")


def test_autocast_context_is_noop_for_fp32_and_casts_for_bf16() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    assert isinstance(autocast_context(CPU, torch.float32), contextlib.nullcontext)
    with autocast_context(CPU, torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
