"""`mtkd-train`: train a student from an mtkd cache. Thin: build the config, run the recipe.

Every `TrainConfig` field is a flag (`--field-name`) and a config-file key; flags override the
file. Mapping-valued keys take JSON on the command line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from typing import Any

import click

from mtkd_train.config import ConfigError, TrainConfig, load_config_file

_TYPES: dict[str, Any] = {"int": int, "float": float, "bool": bool, "str": str, "str | None": str,
                          "int | None": int}


def _field_docs() -> dict[str, str]:
    """Field docstrings of TrainConfig (the string literal under each field)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)  # type: ignore[union-attr]
    return docs


def _options(fn: Any) -> Any:
    docs = _field_docs()
    for f in reversed(dataclasses.fields(TrainConfig)):
        if f.name == "cache":
            continue
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = docs.get(f.name, "") + (f" [default: {default}]" if default not in (None, "", ()) else "")
        if f.type == "bool":
            fn = click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=None, help=help_)(fn)
        elif f.type in _TYPES:
            fn = click.option(name, type=_TYPES[f.type], default=None, help=help_)(fn)
        elif f.name == "teachers":
            fn = click.option(name, default=None, help=help_ + " Comma-separated.")(fn)
        else:
            fn = click.option(name, default=None, help=help_ + " JSON object.")(fn)
    return fn


def build_config(cache: str | None, config: str | None, flags: dict[str, Any]) -> TrainConfig:
    """File values, then flags (given ones only), then the positional CACHE."""
    values: dict[str, Any] = load_config_file(config) if config else {}
    for key, value in flags.items():
        if value is None:
            continue
        f = next(x for x in dataclasses.fields(TrainConfig) if x.name == key)
        if f.type not in _TYPES and key != "teachers":
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise click.BadParameter(f"not valid JSON: {e}", param_hint=f"--{key.replace('_', '-')}") from e
        values[key] = value
    if cache:
        values["cache"] = cache
    return TrainConfig.from_dict(values)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("cache", required=False)
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="TOML or YAML file with any of the keys below.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint. Refused if a teacher was re-cached since or a setting that changes a step differs; the LR schedule that was running continues (see --max-steps).")
@click.option("--eval-teachers/--no-eval-teachers", default=True, help="Also score the cached teachers on --eval-cache.")
@_options
def main(cache: str | None, config: str | None, resume: bool, eval_teachers: bool, **flags: Any) -> None:
    """Distil a student from the cached targets of several teachers (no teacher is loaded).

    CACHE: Training cache path or fsspec URL. (In a --config file: the `cache` key.)

    Example: mtkd-train CACHE --teachers a,b,c --aggregate entropy --loss forward_kl --alpha 0.5
    --temperature 2 --student PATH --out RUN
    """
    from mtkd_train.errors import USER_ERRORS, one_line
    try:
        cfg = build_config(cache, config, flags)
        recipe = _recipe(cfg).setup(resume=resume)
    except USER_ERRORS as e:
        raise click.ClickException(one_line(e)) from e
    try:
        losses = recipe.train()
        if recipe.stopped:  # SIGTERM: the checkpoint is written; leave before the grace period ends
            if recipe.rank == 0:
                click.echo(f"stopped by SIGTERM after step {recipe.step}; checkpoint saved; continue with --resume")
            return
        path = recipe.save()
        res = recipe.evaluate(teachers=eval_teachers) if cfg.eval_cache else None  # every rank takes a share
        if recipe.rank == 0:
            click.echo(f"trained {recipe.step} steps; final loss {losses[-1]:.4f}; student saved to {path}")
            if res is not None:
                (recipe.out / "eval.json").write_text(json.dumps(res, indent=2))
                click.echo(json.dumps(res, indent=2))
    except USER_ERRORS as e:
        raise click.ClickException(one_line(e)) from e
    finally:
        recipe.close()


def _recipe(cfg: TrainConfig) -> Any:
    """`FeatureRecipe` when every teacher is feature-only (no head: features alone), else `DistillRecipe`."""
    from mtkd_cache import open_cache
    from mtkd_train.embed import FeatureRecipe, is_feature_only
    from mtkd_train.recipe import DistillRecipe

    reader = open_cache(cfg.cache, dict(cfg.storage_options) or None)
    if is_feature_only(reader, list(cfg.teachers)):
        return FeatureRecipe(cfg)
    only = [t for t in cfg.teachers if t in reader.teacher_names and reader.teacher(t).meta.target.kind == "none"]
    if only:
        raise ConfigError(f"`teachers` (--teachers): {only} are feature-only (no head, no targets) and the others "
                          f"store targets; distil feature-only teachers in a run of their own")
    return DistillRecipe(cfg)


if __name__ == "__main__":
    main()
