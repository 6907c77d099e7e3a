"""The teacher forward pass: one batch in, logits (and the asked hidden states) out, no graph.

Split from `models` (which loads teachers): inputs move to the teacher's device, floating inputs
take its dtype, Hugging Face teachers keep only the requested hidden layers.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mtkd_cache.errors import UnsupportedTeacherError
from mtkd_cache.format.packing import DOC_START, isolated_inputs
from mtkd_cache.precompute.models import LoadedTeacher

__all__ = ["forward_teacher"]

def forward_teacher(
    teacher: LoadedTeacher,
    batch: Mapping[str, torch.Tensor],
    *,
    want_hidden: bool | Sequence[int],
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...] | None]:
    """Run the teacher on one batch without building an autograd graph.

    Tensors are moved to the teacher's device; floating inputs (e.g. ``pixel_values``) are cast
    to its dtype. Run it under ``autocast_context`` for half precision.

    Args:
        teacher: From ``load_teacher``.
        batch: Model inputs by keyword, e.g. ``input_ids`` (B, L) and ``attention_mask`` (B, L),
            or ``pixel_values`` (B, C, H, W).
        want_hidden: Also return the hidden states: ``True`` for all, or the HF indices of the
            layers wanted. A Hugging Face teacher then keeps only those (transformers records the
            selected layers with forward hooks; the others come back as ``None``), so activations
            of every layer never exist at once; a factory gets ``output_hidden_states=True``.

    Returns:
        ``(logits, hidden)``: logits (B, L, V_padded) for causal LMs (and factories returning
        3-D logits) or (B, 1, V_padded) for classifiers; hidden is the tuple of hidden states
        (embeddings, then one per layer, each (B, L, D) for transformers) or ``None``.

    Raises:
        UnsupportedTeacherError: Hidden states were asked of a factory that cannot return them,
            or the output has no logits of a usable shape.
    """
    module = teacher.module
    inputs = teacher_inputs(teacher, batch)
    if want_hidden and teacher.task == "custom" and not _accepts_hidden_flag(module):
        raise UnsupportedTeacherError(
            f"teacher {teacher.model_id!r}: features were requested but its forward() takes no "
            "output_hidden_states argument; add one that returns .hidden_states, or drop "
            "feature targets for this teacher"
        )
    extra: dict[str, Any] = {}
    if want_hidden:
        select = teacher.task != "custom" and not isinstance(want_hidden, bool)
        extra["output_hidden_states"] = list(want_hidden) if select else True  # type: ignore[arg-type]
    with torch.inference_mode():
        output = module(**inputs, **extra)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (2, 3):
        raise UnsupportedTeacherError(
            f"teacher {teacher.model_id!r} returned {type(output).__name__} without a 2-D or 3-D "
            "logits tensor; return logits (B, V) / (B, L, V) or an object with .logits"
        )
    if logits.ndim == 2:
        logits = logits.unsqueeze(1)  # (B, 1, V) one row per sample
    if not want_hidden:
        return logits, None
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        raise UnsupportedTeacherError(
            f"teacher {teacher.model_id!r} was called with output_hidden_states=True but its "
            "output has no .hidden_states; return them or drop feature targets for this teacher"
        )
    return logits, tuple(hidden)


def teacher_inputs(teacher: LoadedTeacher, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch on the model's input device and dtype, packed documents isolated (`_isolate_documents`).

    Shared by `forward_teacher` and the head-block path (`headblocks.forward_body`), so both see
    exactly the same inputs.
    """
    module = teacher.module
    parameter = next(iter(module.parameters()), None)
    device = _input_device(module, parameter)
    model_dtype = parameter.dtype if parameter is not None else torch.float32
    inputs = {
        key: value.to(device, model_dtype) if value.is_floating_point() else value.to(device)
        for key, value in batch.items()
    }
    return _isolate_documents(teacher, inputs, model_dtype)


def _isolate_documents(teacher: LoadedTeacher, inputs: dict[str, torch.Tensor], dtype: torch.dtype
                       ) -> dict[str, torch.Tensor]:
    """Packed inputs (a ``doc_start`` key): every document attends only to itself (format/packing.py).

    Hugging Face decoders take the block-diagonal 4-D mask and restarting position ids; a factory
    teacher gets its inputs without the marks (its forward decides what it supports).
    """
    marks = inputs.pop(DOC_START, None)
    if marks is None or teacher.task == "custom":
        return inputs
    return {**inputs, **isolated_inputs(marks, inputs["attention_mask"], dtype)}


def _input_device(module: torch.nn.Module, parameter: torch.nn.Parameter | None) -> torch.device:
    """Where the inputs go: the first device of a dispatched model's map, else its first parameter's."""
    device_map = getattr(module, "hf_device_map", None)
    if device_map:
        first = next(iter(device_map.values()))
        if first in ("cpu", "disk"):  # accelerate's hooks bring offloaded weights to the CPU
            return torch.device("cpu")
        return torch.device("cuda", first) if isinstance(first, int) else torch.device(first)
    return parameter.device if parameter is not None else torch.device("cpu")


def _accepts_hidden_flag(module: torch.nn.Module) -> bool:
    parameters = inspect.signature(module.forward).parameters.values()
    return any(
        p.name == "output_hidden_states" or p.kind is inspect.Parameter.VAR_KEYWORD
        for p in parameters
    )
