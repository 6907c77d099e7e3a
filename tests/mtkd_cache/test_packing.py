"""A packed sample's logits equal each document's logits run alone (Llama architecture)."""

from __future__ import annotations

import pytest
import torch

from mtkd_cache.format.packing import document_ids, packed_attention_mask, packed_position_ids


def test_document_ids_and_positions_restart_at_each_document() -> None:
    doc = document_ids([[0, 3, 5], [0]], 7, [7, 4])
    assert doc.tolist() == [[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, -1, -1, -1]]
    assert packed_position_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 0, 0]]
    with pytest.raises(ValueError, match="doc_starts"):
        document_ids([[1, 3]], 5, [5])
    with pytest.raises(ValueError, match="doc_starts"):
        document_ids([[0, 6]], 7, [5])


def test_mask_is_causal_within_documents_only() -> None:
    doc = document_ids([[0, 2]], 4, [4])
    allowed = packed_attention_mask(doc)[0, 0] == 0
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [False, False, True, False], [False, False, True, True]]


def test_packed_llama_logits_equal_each_document_alone(tmp_path) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    docs = [torch.randint(4, 64, (n,)) for n in (5, 3, 6)]
    packed = torch.cat(docs).unsqueeze(0)  # (1, 14)
    length = packed.shape[1] + 2  # right padding
    ids = torch.cat([packed, torch.zeros(1, 2, dtype=torch.long)], 1)
    doc = document_ids([[0, 5, 8]], length, [14])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=packed_attention_mask(doc),
                    position_ids=packed_position_ids(doc)).logits[0, :14]
        alone = torch.cat([model(input_ids=d.unsqueeze(0)).logits[0] for d in docs])
    lp, la = torch.log_softmax(out, -1), torch.log_softmax(alone, -1)
    assert float((lp - la).abs().max()) < 1e-4
    with torch.no_grad():  # without isolation the later documents differ: the test can fail
        leaky = model(input_ids=packed).logits[0]
    assert float((torch.log_softmax(leaky, -1)[5:] - la[5:]).abs().max()) > 1e-3
