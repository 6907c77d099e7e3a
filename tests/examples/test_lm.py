"""The language-model experiment's data split, scoring and specialist resume (examples/lm)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from examples.lm.domains import Segment, _spread, segments  # noqa: E402
from examples.lm.perplexity import heldout_bits_per_byte, segment_nll  # noqa: E402
from examples.lm.specialist import SpecialistConfig, train_specialist  # noqa: E402
from tests.helpers.tiny_models import save_tiny_causal_lm  # noqa: E402


def test_segments_pack_whole_paragraphs_and_drop_only_scraps() -> None:
    text = "\n\n".join(f"para {i} " + "x" * 40 for i in range(9)) + "\n\nend"  # paragraphs of 47 chars
    segs = list(segments("d", "src", text, segment_chars=100))
    assert [s.index for s in segs] == [0, 1, 2]
    assert all(len(s.text) >= 100 for s in segs)
    longer = text.replace("\n\nend", "\n\n" + "z" * 30)  # a 30-char tail is >= 100 // 4: kept
    assert list(segments("d", "src", longer, segment_chars=100))[-1].text == "z" * 30
    joined = "\n\n".join(s.text for s in segs)
    assert joined == text[: len(joined)]  # paragraphs kept whole and in order
    assert "end" not in joined  # a 3-character tail is a scrap, not a segment


def test_spread_caps_characters_across_the_whole_split() -> None:
    items = [Segment("d", f"s{i}", 0, "y" * 10) for i in range(100)]
    kept = _spread(items, cap_chars=250)
    assert 24 <= len(kept) <= 26
    assert kept[0].source == "s0" and int(kept[-1].source[1:]) >= 90  # spread over, not the first 25


def test_windowed_nll_equals_one_pass(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = save_tiny_causal_lm(tmp_path / "lm", vocab_size=64)
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ids = [int(i) for i in torch.randint(4, 56, (23,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        seq = torch.tensor([[2, *ids]])
        logits = model(input_ids=seq[:, :-1]).logits[0]
        one_pass = torch.nn.functional.cross_entropy(logits, seq[0, 1:], reduction="sum").item()
    assert segment_nll(model, ids, 2, window=64) == pytest.approx(one_pass, rel=1e-5)
    # windows of 5 lose context, so the NLL changes, but every token is still scored once
    windowed = segment_nll(model, ids, 2, window=5)
    assert windowed != pytest.approx(one_pass, rel=1e-6) and math.isfinite(windowed)


def _write_split(data: Path, name: str, texts: list[str]) -> None:
    data.mkdir(parents=True, exist_ok=True)
    (data / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_bits_per_byte_counts_every_byte(tmp_path: Path) -> None:
    path = save_tiny_causal_lm(tmp_path / "lm", vocab_size=64)
    _write_split(tmp_path / "data", "d.heldout.jsonl", ["w1 w2 w3", "w4 w5"])
    r = heldout_bits_per_byte(path, tmp_path / "data", "d")
    assert r["bytes"] == len("w1 w2 w3") + len("w4 w5") and r["tokens"] == 5 and r["segments"] == 2
    # a random tiny LM is near-uniform over 64 ids: about ln(64) nats per token
    assert r["token_perplexity"] == pytest.approx(64, rel=0.3)
    assert r["bits_per_byte"] == pytest.approx(math.log2(r["token_perplexity"]) * 5 / r["bytes"], rel=1e-6)


def test_specialist_resumes_to_the_same_weights(tmp_path: Path) -> None:
    base = save_tiny_causal_lm(tmp_path / "base", vocab_size=64)
    _write_split(tmp_path / "data", "d.train.jsonl", [" ".join(f"w{i % 50}" for i in range(k, k + 40)) for k in range(8)])
    cfg = SpecialistConfig("d", block=8, batch=2, warmup=2, save_every=3, epochs=1.0)
    whole = train_specialist(base, tmp_path / "data", tmp_path / "whole", tmp_path / "s1", cfg)
    # the same run, stopped after its first saved state and started again
    cut = SpecialistConfig("d", block=8, batch=2, warmup=2, save_every=3, epochs=1.0)
    from examples.lm import specialist as sp

    calls = {"n": 0}
    real_save = torch.save

    def stop_after_first_save(obj, f):  # type: ignore[no-untyped-def]
        real_save(obj, f)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    sp.torch.save = stop_after_first_save  # type: ignore[attr-defined]
    try:
        with pytest.raises(KeyboardInterrupt):
            train_specialist(base, tmp_path / "data", tmp_path / "resumed", tmp_path / "s2", cut)
    finally:
        sp.torch.save = real_save  # type: ignore[attr-defined]
    resumed = train_specialist(base, tmp_path / "data", tmp_path / "resumed", tmp_path / "s2", cut)
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base_w = load_file(base / "model.safetensors")
    assert any(not torch.equal(a[k], base_w[k]) for k in a)  # it did train
    with pytest.raises(ValueError, match="delete"):
        train_specialist(base, tmp_path / "data", tmp_path / "other", tmp_path / "s2",
                         SpecialistConfig("d", block=8, batch=2, lr=1e-3))
