from __future__ import annotations

from pathlib import Path

import pytest

from mtkd_train.cli import build_config
from mtkd_train.config import ConfigError, TrainConfig, load_config_file

BASE = {"cache": "c", "teachers": ("a", "b"), "student": "s"}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": -0.1}, "alpha"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"aggregate": "median"}, "aggregate"),
        ({"loss": "mse"}, "loss"),
        ({"tail_mode": "drop"}, "tail_mode"),
        ({"merge_in": "worker"}, "merge_in"),
        ({"batch_size": 0}, "batch_size"),
        ({"teachers": ("a", "a")}, "teachers"),
        ({"teachers": ()}, "teachers"),
        ({"features": {"zzz": {"layer": -1}}}, "features"),
        ({"features": {"a": {"layr": -1}}}, r"unknown option\(s\) \['layr'\]"),
        ({"features": {"a": {"student_layer": "last"}}}, "a.student_layer"),
        ({"features": {"a": {"beta": -1}}}, "a.beta"),
        ({"features": {"a": {"kind": "mse"}, "b": {"kind": "cosine"}}}, "one kind"),
    ],
)
def test_bad_values_name_the_key(override: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        TrainConfig(**{**BASE, **override})


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="lerning_rate"):
        TrainConfig.from_dict({**BASE, "lerning_rate": 1e-3})


def test_round_trip_and_fingerprint() -> None:
    cfg = TrainConfig(**BASE, alpha=0.3)
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    # run length and logging do not change what a step computes; the loss mix does
    assert TrainConfig(**BASE, alpha=0.3, max_steps=5).fingerprint() == cfg.fingerprint()
    assert TrainConfig(**BASE, alpha=0.4).fingerprint() != cfg.fingerprint()


def test_file_then_flags(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('cache = "c"\nteachers = ["a", "b"]\nstudent = "s"\nalpha = 0.2\n'
                    '[aggregate_kwargs]\ntau = 2.0\n')
    yml = tmp_path / "run.yaml"
    yml.write_text("cache: c\nteachers: a,b\nstudent: s\nalpha: 0.2\n")
    for f in (toml, yml):
        assert load_config_file(f)["alpha"] == 0.2
    cfg = build_config(None, str(toml), {"alpha": 0.7, "aggregate_kwargs": '{"tau": 3.0}', "lr": None})
    assert cfg.alpha == 0.7 and cfg.aggregate_kwargs == {"tau": 3.0} and cfg.teachers == ("a", "b")
    assert build_config("other", str(yml), {}).cache == "other"


def test_bad_config_file(tmp_path: Path) -> None:
    bad = tmp_path / "x.toml"
    bad.write_text("alpha = = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_operator_and_loss_names_come_from_the_registries() -> None:
    from mtkd_train.aggregate import AGGREGATORS
    from mtkd_train.losses import LOSS_KINDS

    for name in AGGREGATORS:
        TrainConfig(**BASE, aggregate=name)
    for kind in LOSS_KINDS:
        TrainConfig(**BASE, loss=kind)
    assert "skew_reverse_kl" in LOSS_KINDS


def test_features_parse_per_teacher() -> None:
    cfg = TrainConfig(**BASE, features={"b": {"layer": 2, "student_layer": 0, "beta": 0.5}, "a": {}})
    a, b = cfg.feature_specs
    assert (a.teacher, a.layer, a.student_layer, a.beta, a.kind) == ("a", -1, -1, 1.0, "mse")
    assert (b.teacher, b.layer, b.student_layer, b.beta) == ("b", 2, 0, 0.5)
