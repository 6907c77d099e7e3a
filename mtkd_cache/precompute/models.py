"""Teacher loading and the teacher forward pass.

A teacher is named one of three ways:

* a local Hugging Face model folder (``config.json`` plus weights). The task is read from
  ``config.json``'s ``architectures`` (or ``auto_map`` for remote code) and the matching
  ``AutoModelFor*`` class loads it; nothing is tried and caught.
* a hub id (``org/name``), fetched to the local hub cache with ``huggingface_hub`` and then loaded
  like a folder. Offline, or without the files, this fails with ``TeacherLoadError``.
* a factory ``"package.module:function"`` returning an ``nn.Module``.

Weights are read from safetensors when the folder has them, otherwise from ``.bin`` files with
``weights_only=True``; no pickled code is ever executed. ``weights_hash`` fingerprints exactly
the weight files that were loaded (sha256 over sorted file names and streamed bytes) or, for a
factory, the state_dict tensors; when it cannot be computed loading fails, it never falls back to
a random value. Teachers come back in ``eval()`` mode with ``requires_grad`` off.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from mtkd_cache.errors import TeacherLoadError, UnsupportedTeacherError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    "LoadedTeacher",
    "TeacherLoadError",
    "TeacherTask",
    "UnsupportedTeacherError",
    "load_teacher",
]

TeacherTask = Literal["causal_lm", "sequence_classification", "image_classification", "encoder", "custom"]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_HUB_ID_RE = re.compile(r"^[\w][\w.-]*(/[\w][\w.-]*)?$")
_HFTask = Literal["causal_lm", "sequence_classification", "image_classification", "encoder"]
_AUTO_CLASS: dict[_HFTask, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
    "encoder": "AutoModel",
}
_ARCH_SUFFIXES: dict[_HFTask, tuple[str, ...]] = {
    "causal_lm": ("ForCausalLM", "LMHeadModel"),
    "sequence_classification": ("ForSequenceClassification",),
    "image_classification": ("ForImageClassification",),
    "encoder": ("Model",),  # BertModel, DINOv2Model...: no head, hidden states only (features-only teacher)
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class LoadedTeacher:
    """A teacher ready for ``forward_teacher``, with what the cache records about it.

    Attributes:
        module: The model, in eval mode with gradients off, on its device and dtype.
        task: What the outputs mean; classifiers give one row per sample.
        model_id: The model string the teacher was loaded from, as given.
        revision: Hub commit the files were resolved to, the requested revision for local
            folders, or ``None``.
        weights_hash: sha256 hex digest of the loaded weight files (or factory state_dict).
        vocab_size: Number of classes/tokens to trust: the tokenizer's length for LMs with a
            tokenizer (capped at the head width), ``num_labels`` for classifiers.
        padded_vocab_size: Width of the model's output (LM heads are often padded).
        num_layers: Transformer layers, when the config says; hidden states have one more entry.
        hidden_size: Width of the hidden states, when the config says.
        tokenizer_path: Folder holding tokenizer files, when the model folder has them.
        tokenizer: That tokenizer, as loaded to size the vocabulary (``None`` when not loaded): the
            run's checks reuse it instead of parsing the files again (~0.4 s for a 49k vocabulary).
    """

    module: torch.nn.Module
    task: TeacherTask
    model_id: str
    revision: str | None
    weights_hash: str
    vocab_size: int
    padded_vocab_size: int
    num_layers: int | None
    hidden_size: int | None
    tokenizer_path: str | None
    tokenizer: Any = field(default=None, repr=False, compare=False)


def load_teacher(
    model: str,
    *,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    revision: str | None = None,
    factory_kwargs: Mapping[str, Any] | None = None,
    device_map: str | None = None,
    max_memory: Mapping[int | str, int | str] | None = None,
) -> LoadedTeacher:
    """Load a teacher from a local folder, a hub id or a ``"package.module:function"`` factory.

    Args:
        model: Local Hugging Face model folder, hub id, or factory spec.
        device: Device to put the teacher on.
        dtype: Dtype to load the weights in.
        trust_remote_code: Allow model code shipped with the checkpoint; off by default.
        revision: Hub revision (branch, tag or commit); recorded as given for local folders.
        factory_kwargs: Keyword arguments for a factory; only valid with a factory spec.
        device_map: Spread a Hugging Face teacher over devices with accelerate (``"auto"``,
            ``"balanced"``, ...) instead of moving it to ``device``; for teachers larger than one
            GPU. Layers that do not fit in ``max_memory`` are offloaded to the CPU or disk.
        max_memory: Budget per device for ``device_map`` (GPU index or ``"cpu"`` -> bytes or
            ``"40GiB"``); ``None`` lets accelerate use every visible device.

    Returns:
        The loaded teacher and its metadata.

    Raises:
        TeacherLoadError: The folder, hub id, factory or weight files cannot be found.
        UnsupportedTeacherError: The architecture is not a causal LM, sequence or image
            classifier, remote code is needed but not trusted, or a factory misbehaves.
    """
    placement = _Placement(device, device_map, dict(max_memory) if max_memory else None)
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise UnsupportedTeacherError(f"--device-map {device_map} places the teacher with accelerate, which is not "
                                      "installed: pip install accelerate (or drop --device-map)")
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TeacherLoadError(
                f"teacher {model!r} is a file; pass the folder that holds config.json and the "
                "weights (the output of save_pretrained)"
            )
        _reject_factory_kwargs(model, factory_kwargs)
        return _load_hf_folder(model, path, placement, dtype, trust_remote_code, revision)
    if _FACTORY_RE.match(model):
        if device_map is not None:
            raise UnsupportedTeacherError(
                f"--device-map {device_map} needs a Hugging Face model folder or id; factory {model!r} "
                "builds and places its own module: drop --device-map (or shard the module inside the factory)")
        return _load_factory(model, device, dtype, dict(factory_kwargs or {}))
    if _HUB_ID_RE.match(model):
        _reject_factory_kwargs(model, factory_kwargs)
        folder, resolved = _fetch_hub_snapshot(model, revision, trust_remote_code)
        return _load_hf_folder(model, folder, placement, dtype, trust_remote_code, resolved)
    raise TeacherLoadError(
        f"teacher path {str(path)!r} does not exist; pass an existing Hugging Face model folder "
        "(with config.json), a hub id such as 'org/name', or a factory 'package.module:function'"
    )


def _reject_factory_kwargs(model: str, factory_kwargs: Mapping[str, Any] | None) -> None:
    if factory_kwargs:
        raise UnsupportedTeacherError(
            f"factory_kwargs {sorted(factory_kwargs)} were given for teacher {model!r}, which is "
            "a model folder or hub id, not a 'package.module:function' factory; drop them"
        )


def _fetch_hub_snapshot(
    model_id: str, revision: str | None, trust_remote_code: bool
) -> tuple[Path, str]:
    """Download (or find in the local hub cache) the files of a hub model; safetensors only."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        folder = Path(
            huggingface_hub.snapshot_download(model_id, revision=revision, allow_patterns=patterns)
        )
    except (OSError, HfHubHTTPError, HFValidationError) as error:
        raise TeacherLoadError(
            f"teacher {model_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face hub (revision {revision or 'main'}): {error}. Pass the path of a local "
            "model folder, or run online / pre-populate the hub cache for this id"
        ) from error
    # Snapshot folders are named after the commit they hold.
    return folder, folder.name


def _detect_task(config: Mapping[str, Any], where: str) -> _HFTask:
    """Task of a checkpoint from its config's ``architectures`` / ``auto_map``, without loading."""
    from transformers.models.auto import modeling_auto

    registered: dict[_HFTask, Mapping[str, str | Sequence[str]]] = {
        "causal_lm": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        "sequence_classification": modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        "image_classification": modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        "encoder": modeling_auto.MODEL_MAPPING_NAMES,  # last: a head wins over the base model
    }
    architectures = [str(arch) for arch in config.get("architectures") or []]
    auto_map = dict(config.get("auto_map") or {})
    for task, mapping in registered.items():
        names = {
            n for value in mapping.values() for n in ([value] if isinstance(value, str) else value)
        }
        if names.intersection(architectures) or _AUTO_CLASS[task] in auto_map:
            return task
    for task, suffixes in _ARCH_SUFFIXES.items():
        if any(arch.endswith(suffixes) for arch in architectures):
            return task
    raise UnsupportedTeacherError(
        f"{where} declares architectures {architectures} (auto_map {sorted(auto_map)}), none of "
        "which is a causal LM, sequence or image classifier, or a base model (AutoModel); save the "
        "model with save_pretrained (or a task head) or wrap it in a 'package.module:function' factory"
    )


@dataclass(frozen=True)
class _Placement:
    """Where a Hugging Face teacher goes: `device`, or accelerate's `device_map` within `max_memory`."""

    device: torch.device
    device_map: str | None
    max_memory: dict[int | str, int | str] | None


def _load_hf_folder(
    model_id: str,
    folder: Path,
    placement: _Placement,
    dtype: torch.dtype,
    trust_remote_code: bool,
    revision: str | None,
) -> LoadedTeacher:
    import transformers

    config_file = folder / "config.json"
    if not config_file.is_file():
        raise TeacherLoadError(
            f"teacher folder {str(folder)!r} has no config.json; pass the folder written by "
            "save_pretrained (config.json plus *.safetensors)"
        )
    config = json.loads(config_file.read_text())
    task = _detect_task(config, str(config_file))
    if "auto_map" in config and not trust_remote_code:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise UnsupportedTeacherError(
                f"teacher {model_id!r} needs the model code shipped with it (auto_map "
                f"{sorted(config['auto_map'])}); re-run with --trust-remote-code if you trust it"
            )
    weight_files, use_safetensors = _weight_files(folder)
    weights_hash = _hash_files(weight_files)
    auto_class = getattr(transformers, _AUTO_CLASS[task])
    module: PreTrainedModel = auto_class.from_pretrained(
        str(folder),
        dtype=dtype,
        use_safetensors=use_safetensors,
        weights_only=True,
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        **({"device_map": placement.device_map, "max_memory": placement.max_memory} if placement.device_map else {}),
    )
    frozen = _freeze(module)
    if placement.device_map is None:  # a dispatched model is already where accelerate put it
        frozen.to(placement.device)
    text_config = module.config.get_text_config()
    padded, vocab, tokenizer = _vocab_sizes(module, task, folder, trust_remote_code)
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    return LoadedTeacher(
        module=module,
        task=task,
        model_id=model_id,
        revision=revision,
        weights_hash=weights_hash,
        vocab_size=vocab,
        padded_vocab_size=padded,
        num_layers=getattr(text_config, "num_hidden_layers", None),
        hidden_size=getattr(text_config, "hidden_size", None),
        tokenizer_path=str(folder) if has_tokenizer else None,
        tokenizer=tokenizer,
    )


def _weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files ``from_pretrained`` will read, and whether they are safetensors."""
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors, True
    pickled = sorted(folder.glob("*.bin"))
    if pickled:
        return pickled, False
    raise TeacherLoadError(
        f"teacher folder {str(folder)!r} has no *.safetensors or *.bin weight files, so its "
        "weights cannot be loaded or fingerprinted; save the model with save_pretrained"
    )


def _hash_files(files: list[Path]) -> str:
    """sha256 over (name, size, bytes) of each file in name order, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(file.name.encode() + b"\0" + str(file.stat().st_size).encode() + b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _vocab_sizes(
    module: PreTrainedModel, task: str, folder: Path, trust_remote_code: bool
) -> tuple[int, int, Any]:
    """(padded_vocab_size, vocab_size, the tokenizer loaded to count it or None) of a Hugging Face model."""
    if task == "encoder":  # no head: the embedding table's width is the vocabulary it reads
        size = getattr(module.config.get_text_config(), "vocab_size", None)
        return (int(size), int(size), None) if isinstance(size, int) and size > 0 else (1, 1, None)
    if task != "causal_lm":
        labels = module.config.num_labels
        if labels is None or labels < 1:
            raise UnsupportedTeacherError(
                f"teacher folder {str(folder)!r}: classifier config has num_labels={labels}; "
                "set num_labels (or id2label) in config.json"
            )
        return int(labels), int(labels), None
    head = module.get_output_embeddings()
    width = head.weight.shape[0] if head is not None else module.config.get_text_config().vocab_size
    if width is None:
        raise UnsupportedTeacherError(
            f"teacher folder {str(folder)!r}: the causal LM has no output embedding and its config "
            "has no vocab_size, so the logits width is unknown; set vocab_size in config.json"
        )
    padded = int(width)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return padded, padded, None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(folder), trust_remote_code=trust_remote_code, local_files_only=True
    )
    # len() counts added/special tokens too; ids past the head width cannot be predicted anyway.
    return padded, min(len(tokenizer), padded), tokenizer


def _freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def _load_factory(
    spec: str, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any]
) -> LoadedTeacher:
    module_name, function_name = spec.split(":")
    try:
        factory_module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise TeacherLoadError(
            f"factory {spec!r}: module {module_name!r} cannot be imported ({error}); make sure it "
            "is installed or on PYTHONPATH, or pass a model folder instead"
        ) from error
    factory: Callable[..., Any] | None = getattr(factory_module, function_name, None)
    if not callable(factory):
        raise TeacherLoadError(
            f"factory {spec!r}: module {module_name!r} has no callable {function_name!r}"
        )
    module = factory(**kwargs)
    if not isinstance(module, torch.nn.Module):
        raise UnsupportedTeacherError(
            f"factory {spec!r} returned {type(module).__name__}, expected a torch.nn.Module"
        )
    weights_hash = _hash_state_dict(module, spec)
    vocab = _factory_int(module, spec, ("vocab_size", "num_labels", "num_classes"))
    # Without vocab_size / num_labels / num_classes the module is a feature-only teacher (an encoder
    # or backbone returning hidden states); `run` then refuses it unless only --features are asked.
    task: TeacherTask = "custom" if vocab is not None and not getattr(module, "features_only", False) else "encoder"
    vocab = vocab or 1
    padded = _factory_int(module, spec, ("padded_vocab_size",)) or vocab
    module = _freeze(module.to(device=device, dtype=dtype))
    return LoadedTeacher(
        module=module,
        task=task,
        model_id=spec,
        revision=None,
        weights_hash=weights_hash,
        vocab_size=vocab,
        padded_vocab_size=padded,
        num_layers=_factory_int(module, spec, ("num_layers",)),
        hidden_size=_factory_int(module, spec, ("hidden_size",)),
        tokenizer_path=None,
    )


def _factory_int(module: torch.nn.Module, spec: str, names: tuple[str, ...]) -> int | None:
    """First of ``names`` found on the module or its ``config`` attribute, as an int."""
    sources = [module, getattr(module, "config", None)]
    for name in names:
        for source in sources:
            value = getattr(source, name, None)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise UnsupportedTeacherError(
                    f"factory {spec!r}: attribute {name}={value!r} must be an int"
                )
            return value
    return None


def _hash_state_dict(module: torch.nn.Module, spec: str) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state_dict tensor, in name order."""
    state = module.state_dict()
    if not state:
        raise UnsupportedTeacherError(
            f"factory {spec!r} returned a module with an empty state_dict, so it has no weights "
            "to fingerprint; register its weights as parameters or buffers"
        )
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise UnsupportedTeacherError(
                f"factory {spec!r}: state_dict entry {name!r} is a {type(tensor).__name__}, "
                "not a tensor, so the weights cannot be fingerprinted"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
