"""LoRA students (`--lora-r/--lora-alpha/--lora-targets/--merge-lora`): only adapters train, the
final save holds them (or merged weights), and a resumed run is bit-identical."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mtkd_train.cli import main
from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.recipe import DistillRecipe
from mtkd_train.student import StudentError
from tests.helpers.tiny_models import save_tiny_causal_lm
from tests.mtkd_train._train_target import STUDENT_HEAD, VOCAB, LMCache

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("lora") / "s", vocab_size=STUDENT_HEAD, tokenizer_size=VOCAB,
                               num_layers=1, seed=4)


def _cfg(lm: LMCache, student: Path, out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(cache=str(lm.cache), teachers=("a",), student=str(student), out=str(out),
                                batch_size=4, max_steps=3, checkpoint_every=100, lr=1e-2, warmup_steps=0,
                                aggregate="mean", num_workers=0, progress=False, lora_r=4, lora_alpha=8.0,
                                lora_targets="q_proj,v_proj")
    return TrainConfig(**{**base, **kw})


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_only_adapters_train_and_the_save_holds_them(lm_cache: LMCache, pretrained: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    recipe = DistillRecipe(_cfg(lm_cache, pretrained, tmp_path)).setup()
    recipe.train()
    out = recipe.save()
    assert out is not None and (out / "adapter_config.json").exists()
    adapters = load_file(str(out / "adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)
    assert any(k.endswith("q_proj.lora_B.weight") for k in adapters) and not any("k_proj" in k for k in adapters)
    base = load_file(str(pretrained / "model.safetensors"))
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in recipe.student.module.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(trained[k], v) for k, v in base.items())  # the base is frozen
    assert any(float(v.abs().max()) > 0 for k, v in adapters.items() if "lora_B" in k)  # B left zero: learned
    ids = torch.arange(4, 20).view(2, 8) % VOCAB
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), out)
    assert torch.allclose(_logits(reloaded, ids), _logits(recipe.student.module, ids), atol=1e-5)


def test_merge_lora_saves_a_plain_model_with_the_same_outputs(lm_cache: LMCache, pretrained: Path,
                                                               tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    recipe = DistillRecipe(_cfg(lm_cache, pretrained, tmp_path, merge_lora=True, max_steps=2)).setup()
    recipe.train()
    out = recipe.save()
    assert out is not None and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(4, 20).view(2, 8) % VOCAB
    assert torch.allclose(_logits(merged, ids), _logits(recipe.student.module, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(AutoModelForCausalLM.from_pretrained(pretrained), ids))


def test_resume_is_bit_identical(lm_cache: LMCache, pretrained: Path, tmp_path: Path) -> None:
    full = DistillRecipe(_cfg(lm_cache, pretrained, tmp_path / "a", max_steps=4, checkpoint_every=2)).setup()
    full.train()
    ckpts = tmp_path / "b" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "step_00000002.pt", ckpts)
    resumed = DistillRecipe(_cfg(lm_cache, pretrained, tmp_path / "b", max_steps=4, checkpoint_every=2))
    resumed.setup(resume=True)
    resumed.train()
    assert resumed.losses == full.losses and len(full.losses) == 4
    a, b = full.student.module.state_dict(), resumed.student.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_errors_are_one_line(lm_cache: LMCache, pretrained: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StudentError, match="no weights"):
        DistillRecipe(_cfg(lm_cache, lm_cache.student, tmp_path)).setup()
    with pytest.raises(StudentError, match="lora-targets 'nope'"):
        DistillRecipe(_cfg(lm_cache, pretrained, tmp_path, lora_targets="nope")).setup()
    with pytest.raises(ConfigError, match="need .*lora_r"):
        _cfg(lm_cache, pretrained, tmp_path, lora_r=0, lora_targets="", merge_lora=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ConfigError, match=r"pip install 'mtkd\[lora\]'"):
        _cfg(lm_cache, pretrained, tmp_path)
    res = CliRunner().invoke(main, [str(lm_cache.cache), "--teachers", "a", "--student", str(pretrained),
                                    "--out", str(tmp_path / "cli"), "--lora-r", "4"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert [line for line in res.output.splitlines() if line.strip()] == [
        line for line in res.output.splitlines() if "peft" in line] and "mtkd[lora]" in res.output
