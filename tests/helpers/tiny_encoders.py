"""A tiny sentence-transformers-style encoder folder: BertModel (no head) + 1_Pooling/config.json.

The folder is what `sentence-transformers` saves for e.g. all-MiniLM-L6-v2: the transformer's
`config.json` and weights at the root, `modules.json` naming Transformer -> Pooling (-> Normalize),
and the pooling flags in `1_Pooling/config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

from helpers.tiny_models import build_word_tokenizer

_ST_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}


def write_st_pooling(path: Path, dim: int, mode: str = "mean", normalize: bool = True) -> Path:
    """Write sentence-transformers' modules.json + 1_Pooling/config.json (+ Normalize) into `path`."""
    (path / "1_Pooling").mkdir(parents=True, exist_ok=True)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(mods))
    flags = {key: m == mode for m, key in _ST_KEYS.items()}
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim, **flags}))
    return path


def save_tiny_encoder(path: Path, *, vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2,
                      pooling: str | None = "mean", normalize: bool = True, seed: int = 0) -> Path:
    """Save a tiny BertModel (no head), its word tokenizer and (unless `pooling` is None) ST pooling."""
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=4, intermediate_size=2 * hidden_size, max_position_embeddings=128,
                        pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    model.save_pretrained(path)
    build_word_tokenizer(vocab_size).save_pretrained(path)
    if pooling is not None:
        write_st_pooling(path, hidden_size, pooling, normalize)
    return path
