"""Feature-only teachers: a BertModel (no head) with a sentence-transformers pooling folder.

`mtkd-cache run --features -1 --pool auto` stores one sentence embedding per sample and no
targets; the embeddings equal the model's documented pooling (masked mean, then L2) computed
directly; verify, inspect and the reader treat the teacher as complete; bad flags are refused
with one line before any forward, leaving the cache as it was.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from helpers.tiny_encoders import save_tiny_encoder
from transformers import BertModel

from mtkd_cache import open_cache, verify_cache
from mtkd_cache.cli import main
from mtkd_cache.format.kinds import NoTargetsBlock
from mtkd_cache.ops.inspect import format_report, inspect_cache


def invoke(*args: object) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder") / "enc", pooling="mean", normalize=True)


def _direct_embeddings(folder: Path, cache: Path) -> np.ndarray:
    """all-MiniLM-style embeddings: last hidden state, mean over real tokens, L2-normalised, one by one."""
    model = BertModel.from_pretrained(folder).eval()
    reader = open_cache(cache)
    out = []
    for i in range(reader.inputs.num_samples):
        ids = torch.as_tensor(reader.sample(i)["token_ids"])[None]
        with torch.no_grad():
            h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]  # (L, D)
        out.append(torch.nn.functional.normalize(h.mean(0), dim=0).numpy())
    return np.stack(out)


def test_cli_run_stores_sentence_embeddings_equal_to_the_documented_pooling(
        copy_cache: Callable[..., Path], inputs_template: Path, encoder_dir: Path) -> None:
    cache = copy_cache(inputs_template)
    ran = invoke("run", cache, "--teacher", "enc", "--model", encoder_dir, "--features", "-1", "--pool", "auto",
                 "--device", "cpu", "--batch-size", "3")
    assert ran.exit_code == 0, ran.output
    assert "features only (layer -1 32-d mean+normalize)" in ran.output
    reader = open_cache(cache)
    assert reader.teacher_names == ["enc"]
    meta = reader.teacher("enc").meta
    assert meta.task == "encoder" and meta.target.kind == "none" and meta.features[0].pool == "mean+normalize"
    stored = np.concatenate([reader.read_chunk(c, teachers=["enc"], features={"enc": [-1]}).features["enc"]["layer_m1"]
                             for c in range(reader.num_chunks)])
    assert isinstance(reader.read_chunk(0, teachers=["enc"]).targets["enc"], NoTargetsBlock)
    np.testing.assert_allclose(stored, _direct_embeddings(encoder_dir, cache), atol=2e-3)  # fp16 storage
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=2e-3)
    assert not list((cache / "teachers" / "enc").glob("indices")), "no targets are stored"
    assert verify_cache(cache, progress=False).ok
    report = inspect_cache(cache)
    assert report["teachers"]["enc"]["kind"] == "none" and report["incomplete_teachers"] == []
    assert "teacher enc: encoder features only (layer -1 32-d mean+normalize float16)" in format_report(report)


def test_per_position_features_and_cls_pooling(copy_cache: Callable[..., Path], inputs_template: Path,
                                               encoder_dir: Path) -> None:
    cache = copy_cache(inputs_template)
    for name, pool in (("tok", "none"), ("cls", "cls")):
        assert invoke("run", cache, "--teacher", name, "--model", encoder_dir, "--features", "1",
                      "--pool", pool, "--device", "cpu").exit_code == 0
    reader = open_cache(cache)
    data = reader.read_chunk(0, teachers=["tok", "cls"], features={"tok": [1], "cls": [1]})
    per_pos, cls = data.features["tok"]["layer_1"], data.features["cls"]["layer_1"]
    assert per_pos.shape == (int(data.lengths.sum()), 32) and cls.shape == (len(data.sample_ids), 32)
    np.testing.assert_allclose(cls, per_pos[data.offsets], atol=1e-6)  # CLS = each sample's first position
    assert verify_cache(cache, progress=False).ok


@pytest.mark.parametrize(("args", "match"), [
    (["--features", "-1", "--top-k", "8"], "--top-k 8: teacher 'enc' .* has no output head"),
    (["--features", "-1", "--samples", "4"], "--samples 4: teacher 'enc' .* has no output head"),
    (["--features", "5"], r"--features 5: teacher 'enc' has 2 layers.*-3 to -1"),
    ([], "has no output head .* add --features -1"),
    (["--features", "-1", "--pool", "median"], "--pool 'median'"),
])
def test_bad_flags_are_one_line_errors_and_change_nothing(
        copy_cache: Callable[..., Path], inputs_template: Path, encoder_dir: Path,
        snapshot: Callable[[Path], dict[str, str]], args: list[str], match: str) -> None:
    cache = copy_cache(inputs_template)
    before = snapshot(cache)
    ran = invoke("run", cache, "--teacher", "enc", "--model", encoder_dir, "--device", "cpu", *args)
    assert ran.exit_code != 0
    errors = [line for line in ran.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and re.search(match, errors[0]), ran.output  # one line, naming the input and the fix
    assert snapshot(cache) == before


def test_pool_auto_needs_a_pooling_folder(copy_cache: Callable[..., Path], inputs_template: Path,
                                          tmp_path: Path, snapshot: Callable[[Path], dict[str, str]]) -> None:
    bare = save_tiny_encoder(tmp_path / "bare", pooling=None)
    cache = copy_cache(inputs_template)
    before = snapshot(cache)
    ran = invoke("run", cache, "--teacher", "enc", "--model", bare, "--features", "-1", "--pool", "auto")
    assert ran.exit_code != 0 and "1_Pooling/config.json" in ran.output and "--pool mean" in ran.output
    assert snapshot(cache) == before


def test_layer_out_of_range_for_a_teacher_with_a_head(copy_cache: Callable[..., Path], lm_template: Path,
                                                      lm_dir: Path) -> None:
    cache = copy_cache(lm_template)
    ran = invoke("run", cache, "--teacher", "lm2", "--model", lm_dir, "--features", "7")
    assert ran.exit_code != 0 and "--features 7: teacher 'lm2' has 2 layers" in ran.output
