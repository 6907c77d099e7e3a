"""LoRA students through `peft` (the optional extra ``mtkd[lora]``).

The student's pretrained weights are frozen and low-rank adapters ``B A`` (rank ``r``, scale
``alpha / r``) are trained on the named modules (``lora_targets``; peft's default for the
architecture when empty). ``B`` starts at zero, so step 0 is the pretrained student. Checkpoints
hold the whole training state (frozen base included), so ``--resume`` needs nothing else and is
bit-identical; the final save holds the adapters only (``adapter_config.json`` +
``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained`` on the base), or
with ``merge_lora`` the merged weights as a plain HF model. Cost per step: the base forward plus
``2 r (d_in + d_out)`` multiply-adds per adapted row and module.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from mtkd_train.student import Student, StudentError

__all__ = ["PEFT_FIX", "apply_lora", "peft_available", "save_lora_student", "trainable_counts"]

PEFT_FIX = "install the optional extra: pip install 'mtkd[lora]' (or pip install peft)"

_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def peft_available() -> bool:
    """Whether `peft` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (tests) has no spec
        return False


def _peft() -> Any:
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise StudentError(f"--lora-r needs the peft package, which is not installed; {PEFT_FIX}") from e


def apply_lora(student: Student, *, r: int, alpha: float, targets: str, seed: int) -> Student:
    """Freeze `student` and add LoRA adapters; returns the same student with its module wrapped.

    Args:
        student: An HF causal LM or sequence classifier loaded WITH weights.
        r: Adapter rank (> 0). alpha: Scale numerator (the update is ``alpha / r * B A``).
        targets: Comma-separated module names (``"q_proj,v_proj"``); empty for peft's default.
        seed: Seed of the adapters' initialisation.

    Raises:
        StudentError: peft is missing, the student is a factory or has no pretrained weights, or
            a target names no module.
    """
    peft = _peft()
    if student.task not in _TASK_TYPES or not hasattr(student.module, "save_pretrained"):
        raise StudentError(f"--lora-r applies to Hugging Face causal-LM or sequence-classifier students; "
                           f"{student.spec!r} is a {student.task} {type(student.module).__name__}")
    folder = Path(student.spec)
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise StudentError(f"--student {student.spec!r} has no weights, so LoRA would adapt a random model; give a "
                           f"pretrained student folder or drop --lora-r")
    names = [t.strip() for t in targets.split(",") if t.strip()] or None
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=names,
                             task_type=_TASK_TYPES[student.task])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            student.module = peft.get_peft_model(student.module, config)
        except ValueError as e:
            raise StudentError(f"--lora-targets {targets!r}: {str(e).splitlines()[0]}; name modules of "
                               f"{student.spec!r} (e.g. q_proj,v_proj for Llama)") from e
    return student


def trainable_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_lora_student(student: Student, folder: str | Path, *, merge: bool) -> Path:
    """Save the adapters (or, with `merge`, the merged weights as a plain HF model) to `folder`.

    ``adapter_config.json`` names the base (the student folder) in ``base_model_name_or_path``.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if merge:
        merged = copy.deepcopy(student.module).merge_and_unload()  # type: ignore[operator]
        merged.save_pretrained(str(out), safe_serialization=True)
        return out
    student.module.save_pretrained(str(out), safe_serialization=True)  # type: ignore[operator]
    return out
