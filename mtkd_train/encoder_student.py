"""Encoder students: any Hugging Face base model (`AutoModel`) or a factory returning hidden states.

`load_encoder_student` builds the student from a folder (`config.json`, plus weights if present:
`from_pretrained`, else `from_config` with the seed) or a `package.module:function` factory;
`EncoderStudent.hidden` returns one layer's hidden states; `save` writes what
`AutoModel.from_pretrained` reads (a factory: safetensors + factory.json, as `student.save_student`),
and `save_pooling` the sentence-transformers files (`modules.json`, `1_Pooling/config.json`) that
name the pooling, so `sentence-transformers` or a reader of those files embeds as the trainer did.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkd_cache.precompute.encoder import hidden_states_of
from mtkd_cache.precompute.pooling import PoolingSpec
from mtkd_train.student import Student, StudentError, load_student, save_student

__all__ = ["EncoderStudent", "load_encoder_student", "save_pooling"]

_ST_KEYS = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens",
            "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
_INPUT_KEYS = ("input_ids", "attention_mask")


@dataclass
class EncoderStudent:
    """A student read through its hidden states (no head, no logits)."""

    module: torch.nn.Module
    spec: str
    kwargs: dict[str, Any]
    hidden_size: int
    num_layers: int
    vocab_size: int | None

    def hidden(self, batch: Mapping[str, Any], layer: int) -> torch.Tensor:
        """Hidden states of `layer` (HF index), (B, L, D) (or (B, D) from a factory that pools itself)."""
        keys = _INPUT_KEYS if "input_ids" in batch else tuple(k for k in batch if k == "pixel_values")
        out: Any = self.module(**{k: batch[k] for k in keys if k in batch}, output_hidden_states=True)
        states = hidden_states_of(out)
        if states is None:
            raise StudentError(f"--student {self.spec!r} returned {type(out).__name__} without hidden states; return "
                               ".hidden_states (embeddings, then one per layer) or the last layer as a tensor")
        return states[layer]

    def save(self, folder: Path) -> Path:
        return save_student(Student(self.module, "encoder", self.spec, self.kwargs, 0), folder)


def load_encoder_student(spec: str, kwargs: Mapping[str, Any] | None = None, *, seed: int = 0) -> EncoderStudent:
    """Build an encoder student from an HF folder (AutoModel; weights if present) or a factory.

    Raises:
        StudentError: the folder or factory cannot be built, or exposes no hidden size.
    """
    folder = Path(spec)
    if folder.is_dir() and (folder / "config.json").is_file():
        from transformers import AutoConfig, AutoModel

        torch.manual_seed(seed)
        has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
        try:
            module = (AutoModel.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
                      if has_weights else
                      AutoModel.from_config(AutoConfig.from_pretrained(str(folder), local_files_only=True)))
        except (OSError, ValueError, KeyError) as e:
            raise StudentError(f"--student {spec!r}: cannot build an AutoModel from its config.json ({e}); use a "
                               f"transformers config of a base model (e.g. BertConfig) saved with save_pretrained") from e
        module = module.float()
    else:
        module = load_student(spec, kwargs, seed=seed).module
    cfg = getattr(module, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    width = getattr(text, "hidden_size", None) or getattr(module, "hidden_size", None)
    layers = getattr(text, "num_hidden_layers", None) or getattr(module, "num_layers", None)
    if not isinstance(width, int) or not isinstance(layers, int):
        raise StudentError(f"--student {spec!r} exposes no int hidden_size / num_hidden_layers (config or module "
                           f"attributes); set them so the feature losses know its width")
    vocab = getattr(text, "vocab_size", None)
    return EncoderStudent(module, spec, dict(kwargs or {}), width, layers, vocab if isinstance(vocab, int) else None)


def save_pooling(folder: Path, spec: PoolingSpec, hidden_size: int) -> None:
    """Write sentence-transformers' `modules.json` and `1_Pooling/config.json` (+ Normalize) for `spec`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if spec.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (folder / "1_Pooling").mkdir(parents=True, exist_ok=True)
    flags = {key: mode in spec.modes for mode, key in _ST_KEYS.items()}
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": hidden_size, **flags, "include_prompt": True}, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
