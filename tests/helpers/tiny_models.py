"""Tiny real models for tests, built from configs and saved like a real checkpoint.

Every builder writes a folder through ``save_pretrained`` (safetensors) so tests load it back
through the real ``from_pretrained`` path; nothing is downloaded. Builders seed their own RNG
(``torch.random.fork_rng``), so the same arguments give byte-identical weights and the global
RNG is left untouched.

The tokenizer is a word-level ``tokenizers`` model: ``"w0 w1 w2"`` encodes to three ids, which
keeps expected token ids obvious in tests. ``tiny_factory_lm`` / ``tiny_factory_classifier`` are
importable ``"module:function"`` factories for the factory-teacher path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
)

__all__ = [
    "LM_HEAD_PADDING",
    "SPECIAL_TOKENS",
    "TinyFactoryOutput",
    "build_word_tokenizer",
    "save_tiny_bert_classifier",
    "save_tiny_causal_lm",
    "save_tiny_vit_classifier",
    "tiny_factory_classifier",
    "tiny_factory_lm",
]

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
"""Ids 0..3 of every tiny tokenizer: pad, unk, bos, eos. Words ``w0, w1, ...`` follow from id 4."""

LM_HEAD_PADDING = 8
"""Columns the tiny causal LM's head has beyond its tokenizer by default, like padded real LMs."""


def build_word_tokenizer(size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer with ``size`` tokens: the 4 special tokens, then ``w0 .. w{size-5}``.

    Args:
        size: Total vocabulary, >= 5.

    Returns:
        A fast tokenizer; whitespace-split words map to ids, unknown words to ``<unk>`` (1).
    """
    if size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"tokenizer size must be >= {len(SPECIAL_TOKENS) + 1}, got {size}")
    words = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(size - len(SPECIAL_TOKENS)))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    pad, unk, bos, eos = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos
    )


def save_tiny_causal_lm(
    path: Path,
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    tokenizer_size: int | None = None,
    with_tokenizer: bool = True,
    seed: int = 0,
) -> Path:
    """Save a tiny Llama-style causal LM (and its tokenizer) to ``path``.

    Args:
        path: Output folder (created).
        vocab_size: Width of the LM head (the padded vocabulary). 140_000 exercises ids > 65535.
        hidden_size: Model width; 4 attention heads, 2 key/value heads.
        num_layers: Decoder layers.
        tokenizer_size: Tokenizer vocabulary; default ``vocab_size - LM_HEAD_PADDING`` so the
            head is padded like real LMs'.
        with_tokenizer: Save a tokenizer next to the model.
        seed: Weight initialisation seed.

    Returns:
        ``path``.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    if with_tokenizer:
        size = vocab_size - LM_HEAD_PADDING if tokenizer_size is None else tokenizer_size
        build_word_tokenizer(size).save_pretrained(path)
    return path


def save_tiny_bert_classifier(
    path: Path, *, num_labels: int = 3, vocab_size: int = 64, seed: int = 0
) -> Path:
    """Save a tiny BERT sequence classifier (2 layers, width 32) and its tokenizer to ``path``.

    Args:
        path: Output folder (created).
        num_labels: Classes of the classification head.
        vocab_size: Embedding rows and tokenizer size.
        seed: Weight initialisation seed.

    Returns:
        ``path``.
    """
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    config.num_labels = num_labels  # a PretrainedConfig property, not a typed constructor field
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    build_word_tokenizer(vocab_size).save_pretrained(path)
    return path


def save_tiny_vit_classifier(
    path: Path, *, num_labels: int = 5, image_size: int = 16, seed: int = 0
) -> Path:
    """Save a tiny ViT image classifier (2 layers, width 32, 4x4 patches, RGB) to ``path``.

    Inputs are ``pixel_values`` (B, 3, image_size, image_size); hidden states have
    ``(image_size / 4) ** 2 + 1`` positions (patches plus CLS).

    Args:
        path: Output folder (created).
        num_labels: Classes of the classification head.
        image_size: Square input side, a multiple of 4.
        seed: Weight initialisation seed.

    Returns:
        ``path``.
    """
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    config.num_labels = num_labels
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ViTForImageClassification(config)
    model.save_pretrained(path)
    return path


@dataclass(frozen=True)
class TinyFactoryOutput:
    """What ``TinyFactoryLM.forward`` returns: HF-style ``.logits`` and ``.hidden_states``."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None


class TinyFactoryLM(torch.nn.Module):
    """Embedding -> 1 linear layer -> head; a non-HF module that supports hidden states."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = 1
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.layer = torch.nn.Linear(hidden_size, hidden_size)
        self.head = torch.nn.Linear(hidden_size, vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> TinyFactoryOutput:
        """input_ids (B, L) -> logits (B, L, V); hidden states (embeddings, layer) (B, L, D)."""
        embedded = self.embed(input_ids)  # (B, L, D)
        hidden = torch.tanh(self.layer(embedded))  # (B, L, D)
        states = (embedded, hidden) if output_hidden_states else None
        return TinyFactoryOutput(logits=self.head(hidden), hidden_states=states)


class TinyFactoryClassifier(torch.nn.Module):
    """Masked-mean embedding classifier returning a bare (B, C) tensor; no hidden states."""

    def __init__(self, vocab_size: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = torch.nn.Embedding(vocab_size, num_classes)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids (B, L) -> logits (B, C)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        weights = attention_mask.to(self.embed.weight.dtype).unsqueeze(-1)  # (B, L, 1)
        total = (self.embed(input_ids) * weights).sum(dim=1)  # (B, C)
        return total / weights.sum(dim=1).clamp_min(1.0)


def tiny_factory_lm(vocab_size: int = 50, hidden_size: int = 16, seed: int = 0) -> TinyFactoryLM:
    """Factory for ``load_teacher("<this module>:tiny_factory_lm", factory_kwargs=...)``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyFactoryLM(vocab_size, hidden_size)


def tiny_factory_classifier(
    vocab_size: int = 50, num_classes: int = 4, seed: int = 0
) -> TinyFactoryClassifier:
    """Factory returning a classifier whose forward takes no ``output_hidden_states``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyFactoryClassifier(vocab_size, num_classes)
