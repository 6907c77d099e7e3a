"""Shared fixtures for the mtkd_cache end-to-end tests: tiny teachers, a corpus, prepared caches.

Everything is built once per session from configs (no downloads) and kept small: a 64-token
word-level tokenizer, ~50 samples of at most 16 positions in chunks of 8. Tests never modify a
session template; they take a private copy with ``copy_cache``.

The causal LM's head is 8 columns wider than its tokenizer (like padded real LMs) and those
padding columns are scaled up so that they would win the top-k if anything ever took the softmax
over the padded width instead of the real vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.tiny_models import (
    LM_HEAD_PADDING,
    save_tiny_bert_classifier,
    save_tiny_causal_lm,
)
from transformers import BertForSequenceClassification, LlamaForCausalLM

from mtkd_cache import RunConfig, prepare, run_teacher

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH = 16
CHUNK_SAMPLES = 8
TOKENIZER_SIZE = 64
"""Real vocabulary: 4 special tokens + words w0 .. w59."""
LM_VOCAB = TOKENIZER_SIZE + LM_HEAD_PADDING
TOP_K = 8
BERT_LABELS = 5
NUM_DOCS = 32

FACTORY_SOURCE = '''
"""Test factories: a classifier whose logits are NaN for samples that start with given tokens."""
import torch
from helpers.tiny_models import TinyFactoryClassifier, tiny_factory_classifier


class NanOnPrefix(torch.nn.Module):
    def __init__(self, inner: TinyFactoryClassifier, prefix: list[int]) -> None:
        super().__init__()
        self.inner = inner
        self.num_classes = inner.num_classes
        self.prefix = prefix

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids, attention_mask)  # (B, C)
        n = len(self.prefix)
        bad = (input_ids[:, :n] == torch.tensor(self.prefix)).all(dim=1, keepdim=True)  # (B, 1)
        return torch.where(bad, torch.full_like(logits, float("nan")), logits)


def nan_classifier(vocab_size: int, num_classes: int, prefix: list[int]) -> NanOnPrefix:
    return NanOnPrefix(tiny_factory_classifier(vocab_size, num_classes), prefix)
'''


def _write_corpus(path: Path) -> None:
    """NUM_DOCS documents of 1..40 words; long ones split into windows, 1-word ones are dropped."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(TOKENIZER_SIZE - 4)]
    lengths = [rng.randint(1, 30) for _ in range(NUM_DOCS - 2)] + [40, 1]
    with path.open("w") as f:
        for i, n in enumerate(lengths):
            text = " ".join(rng.choice(words) for _ in range(n))
            row = {
                "text": text,
                "label": ("neg", "pos", "neu")[i % 3],
                "domain": ("news", "chat")[i % 2],
            }
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mtkd_cache_assets")


@pytest.fixture(scope="session")
def lm_dir(assets: Path) -> Path:
    """Tiny Llama (2 layers, width 32) with a 72-wide head over a 64-token tokenizer."""
    path = save_tiny_causal_lm(assets / "lm", vocab_size=LM_VOCAB, tokenizer_size=TOKENIZER_SIZE)
    model = LlamaForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[TOKENIZER_SIZE:] *= 30.0  # padding columns: large logits
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def lm_model(lm_dir: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(lm_dir).eval()


@pytest.fixture(scope="session")
def lm_logp(lm_model: LlamaForCausalLM) -> Callable[[np.ndarray], torch.Tensor]:
    """Reference: the teacher's own log_softmax over the real vocabulary, (T, 64) float32."""

    def logp(token_ids: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            logits = lm_model(torch.as_tensor(token_ids, dtype=torch.long)[None]).logits[0]
        return torch.log_softmax(logits[:, :TOKENIZER_SIZE].float(), dim=-1)

    return logp


@pytest.fixture(scope="session")
def bert_dir(assets: Path) -> Path:
    """Tiny BERT sequence classifier with BERT_LABELS classes and the LM's tokenizer."""
    return save_tiny_bert_classifier(
        assets / "bert", num_labels=BERT_LABELS, vocab_size=TOKENIZER_SIZE
    )


@pytest.fixture(scope="session")
def bert_model(bert_dir: Path) -> BertForSequenceClassification:
    return BertForSequenceClassification.from_pretrained(bert_dir).eval()


@pytest.fixture(scope="session")
def corpus(assets: Path) -> Path:
    path = assets / "corpus.jsonl"
    _write_corpus(path)
    return path


@pytest.fixture(scope="session")
def inputs_template(assets: Path, corpus: Path, lm_dir: Path) -> Path:
    """Prepared inputs only (no teacher): ~50 samples, max_length 16, chunks of 8 samples."""
    cache = assets / "inputs_template"
    prepare(
        cache,
        corpus,
        tokenizer=lm_dir,
        max_length=MAX_LENGTH,
        chunk_samples=CHUNK_SAMPLES,
        domain_column="domain",
        progress=False,
    )
    return cache


@pytest.fixture(scope="session")
def lm_template(assets: Path, inputs_template: Path, lm_dir: Path) -> Path:
    """The inputs plus teacher ``lm``: top-8, u8log values, fp16 tail, no features."""
    cache = Path(shutil.copytree(inputs_template, assets / "lm_template"))
    run_teacher(cache, RunConfig(teacher="lm", model=str(lm_dir), top_k=TOP_K), progress=False)
    return cache


@pytest.fixture
def copy_cache(tmp_path: Path) -> Callable[..., Path]:
    """``copy_cache(template, name="cache")``: a private copy a test may change or damage."""

    def copy(template: Path, name: str = "cache") -> Path:
        return Path(shutil.copytree(template, tmp_path / name))

    return copy


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) -> sha256 of its bytes: a listing plus checksums."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def snapshot() -> Callable[[Path], dict[str, str]]:
    return tree_digest


@pytest.fixture(scope="session")
def factory_dir(assets: Path) -> Path:
    """A folder holding ``mtkd_test_factories.py``; put it on sys.path to use its factories."""
    folder = assets / "factories"
    folder.mkdir()
    (folder / "mtkd_test_factories.py").write_text(FACTORY_SOURCE)
    return folder


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes: this checkout first on the path, one thread, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
    )
    return env


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The folder of this interpreter's console scripts (mtkd-cache, torchrun)."""
    return Path(sys.executable).parent


@pytest.fixture(params=["native", "eager"])
def topk_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once with the compiled top-k kernel (`precompute/native.py`) and once with the torch path."""
    from mtkd_cache.precompute import native

    if request.param == "native":
        if native._compiler() is None:
            pytest.skip("no C++ compiler: the compiled top-k kernel cannot be built here")
        if not native.available():
            pytest.fail("the compiled top-k kernel did not build or failed its self-check")
    else:
        monkeypatch.setitem(native._STATE, "lib", None)
    return str(request.param)
