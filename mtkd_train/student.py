"""Building, running and saving the student: an HF model (config or weights) or a factory.

The student's forward is normalised to `(logits (B, T, V), hidden (B, T, D) | None)` with T = L
for causal LMs and T = 1 for classifiers, so the recipe has one code path.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

__all__ = ["HeadInputs", "Student", "StudentError", "load_student", "save_student"]

_TASKS = {"ForCausalLM": "causal_lm", "ForSequenceClassification": "sequence_classification",
          "ForImageClassification": "image_classification"}


class StudentError(ValueError):
    """The student spec cannot be built or does not fit the cache."""


class HeadInputs(NamedTuple):
    """What the LM head would turn into logits: for the head-fused loss, which never builds them.

    Attributes:
        hidden: ``(B, T, H)`` final hidden states (after the last norm).
        weight: ``(V_s, H)`` head weight.
        bias: ``(V_s,)`` head bias or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass
class Student:
    module: torch.nn.Module
    task: str
    spec: str
    kwargs: dict[str, Any]
    output_size: int

    def forward(self, batch: Mapping[str, torch.Tensor], want_hidden: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run on a batch; return logits (B, T, V) and, if asked, hidden state `want_hidden` (B, T, D)."""
        if self.task in ("causal_lm", "sequence_classification"):
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        else:
            inputs = {k: v for k, v in batch.items() if k in self._array_keys}
        kw: dict[str, Any] = {"output_hidden_states": True} if want_hidden is not None else {}
        out = self.module(**inputs, **kw)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        if logits.ndim == 2:
            logits = logits.unsqueeze(1)
        hidden = None
        if want_hidden is not None:
            h = out.hidden_states[want_hidden]
            hidden = h.unsqueeze(1) if h.ndim == 2 else h
            if self.task != "causal_lm" and hidden.shape[1] != 1:
                hidden = hidden.mean(1, keepdim=True)
        return logits, hidden

    def forward_head(self, batch: Mapping[str, torch.Tensor], want_hidden: int | None = None
                     ) -> tuple[HeadInputs, torch.Tensor | None]:
        """Causal LMs only: run the decoder, not the head; return its inputs and hidden state `want_hidden`."""
        out = self.module.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],  # type: ignore[operator]
                                        output_hidden_states=want_hidden is not None)
        head = self.module.get_output_embeddings()  # type: ignore[operator]
        hidden = None if want_hidden is None else out.hidden_states[want_hidden]
        return HeadInputs(out.last_hidden_state, head.weight, head.bias), hidden

    def supports_fused_head(self) -> bool:
        """True if the logits are exactly ``head(decoder(x))`` (checked once on a short input).

        Models that scale or soft-cap their logits after the head fail the check and keep the
        logits path.
        """
        if self.task != "causal_lm":
            return False
        head = getattr(self.module, "get_output_embeddings", lambda: None)()
        decoder = getattr(self.module, "get_decoder", lambda: None)()
        if not isinstance(head, torch.nn.Linear) or decoder is None:
            return False
        param = next(self.module.parameters())
        ids = torch.arange(1, 5, device=param.device).view(1, 4) % max(self.output_size, 1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad():
                logits, _ = self.forward(batch)
                inputs, _ = self.forward_head(batch)
                fused = torch.nn.functional.linear(inputs.hidden, inputs.weight, inputs.bias)
            return fused.shape == logits.shape and bool(torch.allclose(fused, logits, atol=1e-5, rtol=1e-4))
        finally:
            self.module.train(was_training)

    _array_keys: tuple[str, ...] = ("pixel_values",)


def _task_from_config(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    for arch in cfg.get("architectures") or []:
        for suffix, task in _TASKS.items():
            if arch.endswith(suffix):
                return task
    raise StudentError(f"--student {str(folder)!r}: config.json architectures {cfg.get('architectures')} are not a "
                       f"causal LM, sequence or image classifier; set `architectures` or use a factory")


def load_student(spec: str, kwargs: Mapping[str, Any] | None = None, *, seed: int = 0,
                 array_keys: tuple[str, ...] = ("pixel_values",)) -> Student:
    """Build the student from an HF folder (weights loaded if present, else initialised from config) or a factory."""
    torch.manual_seed(seed)
    kwargs = dict(kwargs or {})
    folder = Path(spec)
    if folder.is_dir() and (folder / "config.json").exists() and not (folder / "factory.json").exists():
        import transformers

        task = _task_from_config(folder)
        auto = {"causal_lm": transformers.AutoModelForCausalLM,
                "sequence_classification": transformers.AutoModelForSequenceClassification,
                "image_classification": transformers.AutoModelForImageClassification}[task]
        has_weights = any(folder.glob("*.safetensors"))
        if has_weights:
            module = auto.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False)
        else:
            config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
            module = auto.from_config(config)
        size = int(module.get_output_embeddings().weight.shape[0]) if task == "causal_lm" else int(module.config.num_labels)
        s = Student(module, task, str(folder), {}, size)
    elif folder.is_dir() and (folder / "factory.json").exists():
        meta = json.loads((folder / "factory.json").read_text())
        s = load_student(meta["spec"], meta["kwargs"], seed=seed, array_keys=array_keys)
        s.module.load_state_dict(load_file(str(folder / "model.safetensors")))
        return s
    elif ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise StudentError(f"--student {spec!r}: cannot import {fn_name!r} from {mod_name!r} ({e})") from e
        module = fn(**kwargs)
        if not isinstance(module, torch.nn.Module):
            raise StudentError(f"--student {spec!r} returned {type(module).__name__}, expected a torch.nn.Module")
        task = getattr(module, "task", "image_classification")
        size = int(getattr(module, "num_labels", getattr(module, "num_classes", 0)))
        s = Student(module, task, spec, kwargs, size)
    else:
        raise StudentError(f"--student {spec!r} is neither a folder with config.json nor a 'package.module:function' "
                           f"factory; create a config with transformers' AutoConfig and save it there")
    s._array_keys = array_keys
    return s


def save_student(student: Student, folder: str | Path) -> Path:
    """Save so that `from_pretrained` (HF students) or `load_student(folder)` (factories) loads it."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(student.module, "save_pretrained"):
        student.module.save_pretrained(str(out), safe_serialization=True)  # type: ignore[operator]
    else:
        state = {k: v.detach().contiguous() for k, v in student.module.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        (out / "factory.json").write_text(json.dumps({"spec": student.spec, "kwargs": student.kwargs}, indent=2))
    return out
