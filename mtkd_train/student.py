"""Building, running and saving the student: an HF model (config or weights) or a factory.

The student's forward is normalised to `(logits (B, T, V), hidden (B, T, D) | None)` with T = L
for causal LMs and T = 1 for classifiers, so the recipe has one code path.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file

from mtkd_cache.format.packing import isolated_inputs

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

    def forward(self, batch: Mapping[str, torch.Tensor], want_hidden: int | Sequence[int] | None = None
                ) -> tuple[torch.Tensor, Any]:
        """Run on a batch; return logits (B, T, V) and, if asked, hidden states.

        `want_hidden` an int gives that layer's hidden state (B, T, D); a sequence of layers gives
        {layer: (B, T, D)}; None gives None.
        """
        if self.task in ("causal_lm", "sequence_classification"):
            inputs = {"input_ids": batch["input_ids"], **self._attention(batch)}
        else:
            inputs = {k: v for k, v in batch.items() if k in self._array_keys}
        kw: dict[str, Any] = {"output_hidden_states": True} if want_hidden is not None else {}
        out = self.module(**inputs, **kw)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        if logits.ndim == 2:
            logits = logits.unsqueeze(1)
        return logits, self._pick_hidden(out.hidden_states if want_hidden is not None else None, want_hidden)

    def _pick_hidden(self, states: Sequence[torch.Tensor] | None, want_hidden: int | Sequence[int] | None) -> Any:
        if want_hidden is None or states is None:
            return None
        if isinstance(want_hidden, int):
            return self._hidden(states[want_hidden])
        return {layer: self._hidden(states[layer]) for layer in want_hidden}

    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        hidden = h.unsqueeze(1) if h.ndim == 2 else h
        if self.task != "causal_lm" and hidden.shape[1] != 1:
            hidden = hidden.mean(1, keepdim=True)
        return hidden

    def forward_head(self, batch: Mapping[str, torch.Tensor], want_hidden: int | Sequence[int] | None = None
                     ) -> tuple[HeadInputs, Any]:
        """Causal LMs only: run the decoder, not the head; return the head's inputs and hidden states as `forward`."""
        out = self.module.get_decoder()(input_ids=batch["input_ids"], **self._attention(batch),  # type: ignore[operator]
                                        output_hidden_states=want_hidden is not None)
        head = self.module.get_output_embeddings()  # type: ignore[operator]
        hidden = self._pick_hidden(out.hidden_states if want_hidden is not None else None, want_hidden)
        return HeadInputs(out.last_hidden_state, head.weight, head.bias), hidden

    def _attention(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The attention keywords: the 2-D mask, or for packed causal-LM batches (a ``doc_start`` key)
        a block-diagonal 4-D mask with restarting position ids, so each document sees only itself."""
        if "doc_start" not in batch or self.task != "causal_lm" or not hasattr(self.module, "get_decoder"):
            return {"attention_mask": batch["attention_mask"]}
        param = next(self.module.parameters())
        dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype
        return isolated_inputs(batch["doc_start"], batch["attention_mask"], dtype)

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


def _master_float32(module: torch.nn.Module) -> torch.nn.Module:
    """Float32 master weights: a student saved in bf16/fp16 trains in float32; autocast computes in bf16."""
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in module.parameters()):
        module = module.to(torch.float32)
    return module


def _load_hf(folder: Path) -> Student:
    import transformers

    task = _task_from_config(folder)
    auto = {"causal_lm": transformers.AutoModelForCausalLM,
            "sequence_classification": transformers.AutoModelForSequenceClassification,
            "image_classification": transformers.AutoModelForImageClassification}[task]
    try:
        if any(folder.glob("*.safetensors")):
            module = auto.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False,
                                          dtype=torch.float32)
        else:
            config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
            module = auto.from_config(config)
    except (OSError, ValueError) as e:
        raise StudentError(f"--student {str(folder)!r} cannot be loaded ({type(e).__name__}: {e}); check its "
                           f"config.json and weight files") from e
    size = int(module.get_output_embeddings().weight.shape[0]) if task == "causal_lm" else int(module.config.num_labels)
    return Student(_master_float32(module), task, str(folder), {}, size)


def _load_saved_factory(folder: Path, seed: int, array_keys: tuple[str, ...], trust_factory: bool) -> Student:
    """A student saved by `save_student` from a factory: factory.json names the code to import."""
    try:
        meta = json.loads((folder / "factory.json").read_text())
        spec, kwargs = str(meta["spec"]), dict(meta["kwargs"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StudentError(f"--student {str(folder)!r}: factory.json is not a saved student ({e}); re-save it "
                           f"with mtkd_train.student.save_student") from e
    if not trust_factory:
        raise StudentError(f"--student {str(folder)!r} holds a factory.json that would import and run {spec!r}; "
                           f"pass --trust-factory (trust_factory=True) if you trust that folder's author, or "
                           f"pass --student {spec} yourself")
    s = _load_factory(spec, kwargs, seed)
    s.module.load_state_dict(load_file(str(folder / "model.safetensors")))
    s._array_keys = array_keys
    return s


def _load_factory(spec: str, kwargs: dict[str, Any], seed: int) -> Student:
    torch.manual_seed(seed)
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
    return Student(_master_float32(module), task, spec, kwargs, size)


def load_student(spec: str, kwargs: Mapping[str, Any] | None = None, *, seed: int = 0,
                 array_keys: tuple[str, ...] = ("pixel_values",), trust_factory: bool = False) -> Student:
    """Build the student from an HF folder (weights loaded if present, else initialised from config) or a factory.

    Weights are float32 whatever dtype they were saved in (master weights; autocast computes in
    bf16/fp16). A folder never runs code unless asked: HF folders load with
    `trust_remote_code=False`, and a folder holding a `factory.json` (a factory student saved by
    :func:`save_student`) is refused unless `trust_factory`.

    Args:
        spec: HF folder, a folder saved from a factory student, or `package.module:function`.
        kwargs: Keyword arguments of a factory named in `spec`.
        seed: Seed of the initialisation.
        array_keys: Batch keys a factory student's forward takes.
        trust_factory: Allow a folder's factory.json to import the factory it names.

    Returns:
        The student, on the CPU.

    Raises:
        StudentError: the spec cannot be built, or a factory folder without `trust_factory`.
    """
    torch.manual_seed(seed)
    folder = Path(spec)
    if folder.is_dir() and (folder / "factory.json").exists():
        return _load_saved_factory(folder, seed, array_keys, trust_factory)
    if folder.is_dir() and (folder / "config.json").exists():
        s = _load_hf(folder)
    elif ":" in spec:
        s = _load_factory(spec, dict(kwargs or {}), seed)
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
