"""Distilling a feature-only teacher (a BertModel sentence encoder) into an HF encoder student.

Real paths end to end: `mtkd-cache run --features -1 --pool auto` on a tiny BertModel folder with a
sentence-transformers pooling, then `mtkd-train` (click's CliRunner) with a student config folder;
the saved student loads with `AutoModel.from_pretrained` and, pooled as its `1_Pooling/config.json`
says (masked mean, then L2), gives the embeddings the trainer matched, closer to the teacher's
than before training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from helpers.tiny_encoders import save_tiny_encoder
from helpers.tiny_models import save_tiny_causal_lm
from transformers import AutoModel, BertConfig

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher
from mtkd_cache.precompute.pooling import read_pooling
from mtkd_train.cli import main

WORDS = 60


def _corpus(path: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(0)
    lines = [" ".join(f"w{int(w)}" for w in rng.integers(0, WORDS, int(rng.integers(3, 12)))) for _ in range(n)]
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    return path


@pytest.fixture(scope="module")
def enc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    teacher = save_tiny_encoder(root / "teacher", hidden_size=32, pooling="mean", normalize=True)
    cache = root / "cache"
    prepare(cache, _corpus(root / "c.jsonl"), tokenizer=teacher, max_length=16, chunk_samples=16, progress=False)
    run_teacher(cache, RunConfig(teacher="enc", model=str(teacher), features=(-1,), pool="auto"), progress=False)
    run_teacher(cache, RunConfig(teacher="enc2", model=str(save_tiny_encoder(root / "t2", hidden_size=32, seed=1)),
                                 features=(-1,), pool="auto"), progress=False)
    lm = save_tiny_causal_lm(root / "lm", vocab_size=64, tokenizer_size=64)
    run_teacher(cache, RunConfig(teacher="lm", model=str(lm), top_k=4), progress=False)
    return cache


def _student_config(path: Path, hidden: int) -> Path:
    BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=2 * hidden, max_position_embeddings=128, pad_token_id=0).save_pretrained(path)
    return path


def _train(cache: Path, student: Path, out: Path, *extra: str) -> Result:
    args = [str(cache), "--teachers", "enc", "--student", str(student), "--out", str(out), "--max-steps", "40",
            "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "0", "--device", "cpu", "--num-workers", "0",
            "--no-progress", *extra]
    result = CliRunner().invoke(main, args)
    assert "Traceback" not in result.output, result.output
    return result


def _embeddings(folder: Path, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(student embeddings by the saved pooling, computed directly; teacher embeddings from the cache)."""
    model = AutoModel.from_pretrained(folder).eval()
    spec = read_pooling(folder)
    assert spec is not None and spec.modes == ("mean",) and spec.normalize
    reader = open_cache(cache)
    emb, ref = [], []
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c, teachers=["enc"], features={"enc": [-1]})
        ref.append(data.features["enc"]["layer_m1"])
        for i in range(len(data.sample_ids)):
            ids = torch.as_tensor(data.inputs["token_ids"][data.offsets[i]: data.offsets[i] + data.lengths[i]])[None]
            with torch.no_grad():
                h = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            emb.append(torch.nn.functional.normalize(h.mean(0), dim=0).numpy())  # documented: mean, then L2
    return np.stack(emb), np.concatenate(ref)


def test_feature_only_cli_trains_and_saves_an_automodel_with_its_pooling(enc_cache: Path, tmp_path: Path) -> None:
    student = _student_config(tmp_path / "student_cfg", 32)
    out = tmp_path / "run"
    ran = _train(enc_cache, student, out, "--features", '{"enc": {"kind": "cosine"}}')
    assert ran.exit_code == 0, ran.output
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    saved = out / "student"
    assert json.loads((saved / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    emb, teacher = _embeddings(saved, enc_cache)
    # the same untrained student (seed 0, from the config) as a baseline
    untrained = tmp_path / "untrained"
    torch.manual_seed(0)
    AutoModel.from_config(BertConfig.from_pretrained(student)).save_pretrained(untrained)
    (untrained / "1_Pooling").mkdir()
    for name in ("modules.json", "1_Pooling/config.json"):
        (untrained / name).write_text((saved / name).read_text())
    before, _ = _embeddings(untrained, enc_cache)
    cos_after = float((emb * teacher).sum(1).mean())  # both unit vectors
    cos_before = float((before * teacher).sum(1).mean())
    assert cos_after > cos_before + 0.1 and cos_after > 0.8, (cos_before, cos_after)


def test_trainer_embedding_equals_the_saved_models_documented_pooling(enc_cache: Path, tmp_path: Path) -> None:
    from mtkd_train.config import TrainConfig
    from mtkd_train.embed import FeatureRecipe

    student = _student_config(tmp_path / "s", 32)
    cfg = TrainConfig(cache=str(enc_cache), teachers=("enc",), student=str(student), out=str(tmp_path / "r"),
                      max_steps=2, device="cpu", num_workers=0)
    recipe = FeatureRecipe(cfg).setup()
    recipe.train()
    saved = recipe.save()
    batch = next(recipe.batches())
    recipe.student.module.eval()
    with torch.no_grad():
        mine = recipe.embed(batch, -1).numpy()
    direct, _ = _embeddings(saved, enc_cache)
    by_id = {int(s): i for i, s in enumerate(np.concatenate([open_cache(enc_cache).read_chunk(c).sample_ids
                                                              for c in range(open_cache(enc_cache).num_chunks)]))}
    np.testing.assert_allclose(mine, direct[[by_id[int(s)] for s in batch["sample_ids"]]], atol=1e-5)


def test_narrow_student_without_projection_is_a_one_line_error_before_any_step(enc_cache: Path,
                                                                                 tmp_path: Path) -> None:
    student = _student_config(tmp_path / "narrow", 16)
    out = tmp_path / "run"
    ran = _train(enc_cache, student, out)
    assert ran.exit_code != 0
    errors = [line for line in ran.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "32-wide features" in errors[0] and "features.enc.projection = true" in errors[0]
    assert not (out / "metrics.jsonl").exists()
    ok = _train(enc_cache, student, tmp_path / "run2", "--max-steps", "3", "--features",
                '{"enc": {"projection": true}}')
    assert ok.exit_code == 0, ok.output
    rel = _train(enc_cache, student, tmp_path / "run3", "--max-steps", "3", "--features",
                 '{"enc": {"kind": "similarity"}}')  # relational: widths may differ
    assert rel.exit_code == 0, rel.output


def test_two_feature_teachers_mean_target_and_mixed_teachers_refused(enc_cache: Path, tmp_path: Path) -> None:
    student = _student_config(tmp_path / "s", 32)
    for agg in ("mean", "per_teacher"):
        ran = _train(enc_cache, student, tmp_path / agg, "--teachers", "enc,enc2", "--max-steps", "3",
                     "--feature-aggregate", agg)
        assert ran.exit_code == 0, ran.output
    mixed = _train(enc_cache, student, tmp_path / "mixed", "--teachers", "enc,lm")
    errors = [line for line in mixed.output.splitlines() if line.startswith("Error:")]
    assert mixed.exit_code != 0 and len(errors) == 1 and "['enc'] are feature-only" in errors[0]
