"""`prepare --pack` + `run`: each packed document is run in isolation by a Llama teacher.

The cached targets (fp32 values) of every document inside a packed sample equal the teacher's own
top-k log-probabilities on that document run alone, within 1e-4; a run without isolation (the
plain packed sequence) differs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.packed_data import PACKED_VOCAB as VOCAB
from helpers.packed_data import build_packed_cache, documents
from transformers import AutoModelForCausalLM

from mtkd_cache import open_cache


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_packed_cache(tmp_path_factory.mktemp("packed"))


def test_packed_targets_equal_each_document_alone(packed) -> None:  # noqa: ANN001
    reader = open_cache(packed["cache"])
    model = AutoModelForCausalLM.from_pretrained(packed["teacher"]).eval()
    docs = documents(packed["cache"])
    assert sum(b - a > 0 and a > 0 for _, a, b in docs) >= 3  # several documents start mid-sample
    worst, leak = 0.0, 0.0
    for i, a, b in docs:
        s = reader.sample(i, ["t"])
        block, ids = s["targets"]["t"], torch.as_tensor(s["token_ids"])
        with torch.no_grad():
            alone = torch.log_softmax(model(input_ids=ids[a:b][None]).logits[0, :, : VOCAB - 8].float(), -1)
            plain = torch.log_softmax(model(input_ids=ids[None]).logits[0, a:b, : VOCAB - 8].float(), -1)
        top = alone.topk(6, -1)
        np.testing.assert_array_equal(np.sort(block.indices[a:b], -1), np.sort(top.indices.numpy(), -1))
        got = np.take_along_axis(alone.numpy(), block.indices[a:b].astype(np.int64), -1)
        worst = max(worst, float(np.abs(block.logp[a:b] - got).max()))
        tail = 1 - np.exp(got).sum(-1)
        assert np.abs(block.tail[a:b] - tail).max() < 1e-4
        if a > 0:
            leak = max(leak, float((plain - alone).abs().max()))
    assert worst < 1e-4, worst
    assert leak > 1e-3  # without isolation the documents after the first would differ


def test_packed_inputs_carry_document_marks(packed) -> None:  # noqa: ANN001
    reader = open_cache(packed["cache"])
    data = reader.read_chunk(0)
    marks = data.inputs["doc_start"]
    assert marks.shape == data.inputs["token_ids"].shape and marks[data.offsets].all()
    starts = reader.samples.column("doc_starts").to_pylist()[0]
    assert np.flatnonzero(marks[: data.lengths[0]]).tolist() == sorted({0, *starts})


def test_the_teacher_records_isolation_and_an_unisolated_one_is_refused(packed, tmp_path: Path,  # noqa: ANN001
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import shutil

    from mtkd_cache import RunConfig, run_teacher
    from mtkd_cache.errors import CacheMismatchError
    from mtkd_cache.precompute import setup

    assert open_cache(packed["cache"]).teacher("t").meta.documents == "isolated"
    cache = tmp_path / "cache"
    shutil.copytree(packed["cache"], cache)
    real = setup._teacher_meta
    # a teacher cached before isolation existed: the same metadata without the record
    monkeypatch.setattr(setup, "_teacher_meta", lambda *a, **k: dataclasses.replace(real(*a, **k), documents=None))
    run_teacher(cache, RunConfig(teacher="old", model=str(packed["teacher"]), top_k=6), progress=False)
    with pytest.raises(CacheMismatchError, match="before mtkd isolated packed documents.*--overwrite"):
        open_cache(cache).teacher("old")


def test_an_encoder_teacher_on_packed_inputs_is_refused_before_any_forward(packed, tmp_path: Path) -> None:  # noqa: ANN001
    import shutil

    from helpers.tiny_encoders import save_tiny_encoder

    from mtkd_cache import RunConfig, run_teacher
    from mtkd_cache.errors import UnsupportedTeacherError

    cache = tmp_path / "cache"
    shutil.copytree(packed["cache"], cache)
    encoder = save_tiny_encoder(tmp_path / "enc", vocab_size=VOCAB)
    for f in Path(packed["teacher"]).glob("*token*"):  # the cache's tokenizer, so only packing is at issue
        shutil.copy(f, encoder / f.name)
    with pytest.raises(UnsupportedTeacherError, match="packed.*without --pack"):
        run_teacher(cache, RunConfig(teacher="enc", model=str(encoder), features=(-1,), pool="mean"), progress=False)
    assert not (cache / "teachers" / "enc" / "teacher.json").exists()


def test_chunks_smaller_than_the_batch_say_how_to_scale_them(packed, tmp_path: Path,  # noqa: ANN001
                                                             caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from mtkd_cache import RunConfig, run_teacher

    cache = tmp_path / "cache"
    shutil.copytree(packed["cache"], cache)
    with caplog.at_level("WARNING", logger="mtkd_cache.precompute.run"):  # chunks of 2 samples, batches of 3
        run_teacher(cache, RunConfig(teacher="w", model=str(packed["teacher"]), top_k=6, batch_size=3), progress=False)
    assert any("--chunk-samples 3" in r.getMessage() for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtkd_cache.precompute.run"):
        run_teacher(cache, RunConfig(teacher="w2", model=str(packed["teacher"]), top_k=6, batch_size=2), progress=False)
    assert not any("--chunk-samples" in r.getMessage() for r in caplog.records)
