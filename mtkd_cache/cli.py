"""`mtkd-cache`: the command line of mtkd_cache. Thin: parse, call the library, report.

Library errors become `click.ClickException` (a message and exit code 1, no traceback).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from mtkd_cache import errors
from mtkd_cache._version import __version__
from mtkd_cache.format.codecs import (  # the CLI's choices come from the registries
    COMPRESSORS,
    VALUE_CODECS,
)
from mtkd_cache.format.kinds import FEATURE_ENCODINGS

_USER_ERRORS = (errors.CacheNotFoundError, errors.CacheFormatError, errors.CacheIncompleteError,
                errors.CacheMismatchError, errors.CacheExistsError, errors.CacheCorruptError,
                errors.CacheWriteError, errors.InputDataError, ValueError, FileNotFoundError, PermissionError)


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except _USER_ERRORS as e:
            raise click.ClickException(f"{type(e).__name__}: {e}") from e

    return wrapper


def _layers(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"{value!r}: give comma-separated layer indices such as '6,-1'") from e


def _max_memory(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[int | str, str] | None:
    if not value:
        return None
    out: dict[int | str, str] = {}
    for item in value.split(","):
        device, sep, amount = item.partition("=")
        if not sep or not amount.strip() or not (device.strip().isdigit() or device.strip() == "cpu"):
            raise click.BadParameter(f"{item!r}: give DEVICE=AMOUNT pairs such as '0=40GiB,cpu=200GiB'")
        out[int(device) if device.strip().isdigit() else "cpu"] = amount.strip()
    return out


def _storage_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any]:
    if not value:
        return {}
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON ({e.msg}); give an object such as "
                                 "'{\"client_kwargs\": {\"endpoint_url\": \"http://...\"}}'") from None
    if not isinstance(opts, dict):
        raise click.BadParameter("give a JSON object of fsspec options")
    return opts


def _so() -> dict[str, Any]:
    """The group's --storage-options (never echoed: they may hold credentials)."""
    return dict(click.get_current_context().find_root().obj or {})


class _Group(click.Group):
    """The commands here, plus ``score``: `mtkd-score` (it lives in mtkd_train, whose imports load only when called)."""

    LAZY = {"score": ("mtkd_train.scoring.cli", "main")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.LAZY])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.LAZY:
            module, attr = self.LAZY[name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mtkd-cache")
@click.option("--storage-options", envvar="MTKD_STORAGE_OPTIONS", callback=_storage_options, default=None,
              help="fsspec options for a remote CACHE, as JSON (e.g. an S3 endpoint_url); also read from "
                   "$MTKD_STORAGE_OPTIONS. Credentials are better left to the environment (AWS_ACCESS_KEY_ID, ...), "
                   "as boto/fsspec read them.")
@click.pass_context
def main(ctx: click.Context, storage_options: dict[str, Any]) -> None:
    """Precompute teacher soft labels into a versioned Zarr v3 + Parquet cache (docs/FORMAT.md)."""
    ctx.obj = storage_options


def _instruction_options(f: Any) -> Any:
    """`prepare`'s options for instruction data (docs/INSTRUCTION.md)."""
    options = [
        click.option("--messages-column", default=None, help="Column of conversations (lists of {role, content}), "
                     "rendered with the tokenizer's chat template; one sample per row with a stored loss mask."),
        click.option("--prompt-column", default=None, help="Column of prompts (with --completion-column)."),
        click.option("--completion-column", default=None, help="Column of completions (with --prompt-column)."),
        click.option("--train-on", type=click.Choice(["assistant", "all"]), default=None,
                     help="Instruction data: learn the assistant's tokens only (default) or all tokens."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@main.command()
@click.argument("cache")
@click.option("--data", required=True, help="Local text/json/jsonl/parquet/csv file or folder, a saved HF dataset, or a dataset id.")
@click.option("--tokenizer", required=True, help="Tokenizer folder (e.g. the teacher's model folder).")
@click.option("--max-length", type=click.IntRange(min=2), required=True, help="Positions per sample; longer documents are split into windows (labelled documents are truncated).")
@click.option("--text-column", default="text", show_default=True, help="Column holding the text.")
@click.option("--label-column", default=None, help="Optional column with a class label per document.")
@click.option("--domain-column", default=None, help="Optional column with a domain/task name per document.")
@click.option("--split", default="train", show_default=True, help="Split to read from a dataset with splits.")
@click.option("--pack", is_flag=True, help="Join short documents into full-length sequences (boundaries recorded).")
@click.option("--chunk-samples", type=click.IntRange(min=1), default=None, help="Samples per chunk (unit of work/commit). Default: ~32k positions per chunk.")
@click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Stop after this many samples.")
@click.option("--overwrite", is_flag=True, help="Replace inputs prepared with other settings (removes mtkd's own keys, so every teacher; never other files or the data).")
@_instruction_options
@_friendly
def prepare(cache: str, **kw: Any) -> None:
    """Tokenize a dataset once and write the inputs every teacher run will see."""
    from mtkd_cache.precompute.prepare import prepare as _prepare

    meta = _prepare(cache, kw.pop("data"), storage_options=_so() or None, **kw)
    click.echo(f"prepared {meta.num_samples:,} samples, {meta.num_positions:,} positions in "
               f"{meta.grid.num_chunks} chunks; dataset fingerprint {meta.dataset_fingerprint}")


@main.command()
@click.argument("cache")
@click.option("--teacher", required=True, help="Name of the teacher group in the cache, e.g. 'qwen7b'.")
@click.option("--model", required=True, help="HF model folder or id, or a 'package.module:function' factory.")
@click.option("--model-kwargs", default=None, help="JSON object of keyword arguments for a factory.")
@click.option("--top-k", type=click.IntRange(min=1), default=None, help="Keep the k most likely tokens + exact tail mass (default 64; a teacher without a head stores features only).")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Instead of top-k: draws per position, stored as tokens + counts.")
@click.option("--features", callback=_layers, default=None, help="Hidden-state layers to store, e.g. '6,-1'.")
@click.option("--pool", default="none", show_default=True, help="Keep features per position (none) or pool per sample: mean, cls, max, mean_sqrt_len, weightedmean, lasttoken ('+'-joined, optional '+normalize'), or auto (the model folder's 1_Pooling/config.json).")
@click.option("--feature-dtype", type=click.Choice(list(FEATURE_ENCODINGS)), default="float16", show_default=True, help="Stored feature type (int8 has a per-row scale).")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Capture temperature of the stored distribution.")
@click.option("--values", "value_codec", type=click.Choice(list(VALUE_CODECS)), default="u8log", show_default=True, help="Encoding of top-k log-probabilities.")
@click.option("--logp-step", type=float, default=1.0 / 16.0, show_default=True, help="Grid step (nats) of the u8log code.")
@click.option("--compression", type=click.Choice(list(COMPRESSORS)), default="zstd", show_default=True, help="Compressor.")
@click.option("--compression-level", type=int, default=3, show_default=True, help="Compression level.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Samples per forward pass.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, help="Budget of padded tokens per batch.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--device-map", type=click.Choice(["auto", "balanced", "balanced_low_0", "sequential"]), default=None, help="Spread a Hugging Face teacher larger than one GPU over several with accelerate (under torchrun: each rank owns an equal block of the node's GPUs).")
@click.option("--max-memory", callback=_max_memory, default=None, help="Budget per device for --device-map, e.g. '0=40GiB,1=40GiB,cpu=200GiB' (default: free memory of the rank's GPUs).")
@click.option("--dtype", type=click.Choice(["auto", "bf16", "fp16", "fp32"]), default="auto", show_default=True, help="Teacher compute dtype.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampled targets.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code shipped with the checkpoint (off by default).")
@click.option("--overwrite", is_flag=True, help="Replace a teacher group stored with other settings (same settings: resume, nothing is deleted).")
@click.option("--inputs", "inputs_url", default=None, help="Read the inputs from this cache (one you may not write); CACHE is then an overlay holding only this teacher.")
@click.option("--shard", default=None, help="Compute only shard I of N ('I/N', from 0) as an independent job (job arrays); complete the teacher with `mtkd-cache finalize`.")
@_friendly
def run(cache: str, model_kwargs: str | None, inputs_url: str | None, shard: str | None, **kw: Any) -> None:
    """Run one teacher over the cache's inputs and store its targets (resumable; torchrun-shardable)."""
    from mtkd_cache.precompute.run import RunConfig, run_teacher

    try:
        fkw = json.loads(model_kwargs) if model_kwargs else None
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not valid JSON: {e}", param_hint="--model-kwargs") from e
    handler = logging.StreamHandler()  # where the teacher runs (--device auto) and similar notes
    handler.setFormatter(logging.Formatter("mtkd-cache: %(message)s"))
    logger = logging.getLogger("mtkd_cache")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        if shard is not None:
            return _run_shard(cache, RunConfig(**kw), shard, fkw, inputs_url)
        meta = run_teacher(cache, RunConfig(**kw), factory_kwargs=fkw, storage_options=_so() or None,
                           inputs=inputs_url)
    finally:
        logger.removeHandler(handler)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # rank 0 reports for the whole torchrun job
    s = meta.stats
    click.echo(f"teacher {meta.name!r}: {s.get('positions', 0):,} positions, "
               f"{s.get('bytes_per_position', 0):.1f} B/position, "
               + (f"mean tail {s.get('mean_tail', float('nan')):.4f}" if meta.target.kind != "none" else
                  "features only (" + ", ".join(f"layer {f.layer} {f.dim}-d {f.pool}" for f in meta.features) + ")"))


def _run_shard(cache: str, cfg: Any, shard: str, fkw: Any, inputs_url: str | None) -> None:
    from mtkd_cache.precompute.shards import parse_shard, run_shard

    try:
        which = parse_shard(shard)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--shard") from e
    r = run_shard(cache, cfg, which, factory_kwargs=fkw, storage_options=_so() or None, inputs=inputs_url)
    left = "teacher complete" if r.complete else f"{r.remaining} chunk(s) of the teacher still uncommitted"
    hint = "" if r.complete or r.remaining else f"; complete it with `mtkd-cache finalize {cache} --teacher {cfg.teacher}`"
    click.echo(f"shard {shard}: committed chunks {r.chunks}; {left}{hint}")


@main.command()
@click.argument("cache")
@click.option("--teacher", required=True, help="The teacher whose shards are all committed.")
@_friendly
def finalize(cache: str, teacher: str) -> None:
    """Complete a teacher computed with `run --shard I/N`: check every chunk, write teacher.json."""
    from mtkd_cache.precompute.shards import finalize_teacher

    meta = finalize_teacher(cache, teacher, storage_options=_so() or None)
    click.echo(f"teacher {meta.name!r} complete: {meta.stats.positions:,} positions")


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write entropy/tail histograms and the agreement matrix to this PNG.")
@click.option("--max-chunks", type=click.IntRange(min=1), default=8, show_default=True, help="Chunks sampled for histograms and agreement.")
@_friendly
def inspect(cache: str, as_json: bool, plot: Path | None, max_chunks: int) -> None:
    """Report samples, positions, teachers, bytes per position, tail mass, entropy and agreement."""
    from mtkd_cache.ops.inspect import format_report, inspect_cache, plot_report

    r = inspect_cache(cache, max_chunks=max_chunks, storage_options=_so() or None)
    if plot is not None:
        plot_report(r, plot)
    r.pop("_hist")
    click.echo(json.dumps(r, indent=2) if as_json else format_report(r))
    if plot is not None and not as_json:
        click.echo(f"plot written to {plot}")


@main.command()
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--repair", is_flag=True, help="Drop the commit markers of damaged teacher chunks so the next `run` of that teacher recomputes only them.")
@_friendly
def verify(cache: str, as_json: bool, repair: bool) -> None:
    """Check completeness, per-chunk checksums and fingerprints; exit 1 naming any bad chunk."""
    from mtkd_cache.ops.verify import verify_cache

    report = verify_cache(cache, repair=repair, storage_options=_so() or None)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for p in report.problems:
            click.echo(f"PROBLEM: {p}", err=True)
        for key in report.repaired:
            click.echo(f"REPAIRED: removed {key}", err=True)
        click.echo(f"{'OK' if report.ok else 'FAILED'}: {report.chunks_checked} chunks checked, teachers "
                   f"{report.teachers_checked}, {len(report.problems)} problem(s)")
        if report.damaged and repair:
            names = ", ".join(sorted(report.damaged))
            click.echo(f"re-run `mtkd-cache run` for teacher(s) {names} with their original arguments to "
                       f"recompute the damaged chunks", err=True)
    if not report.ok:
        raise SystemExit(1)


@main.command()
@click.argument("cache")
@_friendly
def migrate(cache: str) -> None:
    """Upgrade a cache of an older format version in place, without recomputing any target."""
    from mtkd_cache.ops.migrate import migrate_cache

    done = migrate_cache(cache, storage_options=_so() or None)
    click.echo(f"{cache}: format_version {done.from_version} -> {done.to_version}; "
               f"{done.arrays_rewritten} arrays rewritten, teachers {done.teachers}")


@main.command()
@click.argument("overlay")
@click.argument("cache")
@click.option("--teacher", "teachers", multiple=True, help="Merge only this teacher (repeatable; default: all of the overlay's).")
@_friendly
def merge(overlay: str, cache: str, teachers: tuple[str, ...]) -> None:
    """Copy an overlay's teachers into CACHE (which must have the same inputs), then verify CACHE."""
    from mtkd_cache.ops.merge import merge_overlay

    r = merge_overlay(overlay, cache, teachers=teachers or None, storage_options=_so() or None)
    click.echo(f"merged teacher(s) {r.teachers} into {cache}: {r.files} files, {r.bytes:,} bytes, verified")


@main.command("export")
@click.argument("cache")
@click.argument("out")
@click.option("--license", "license_", default="unknown", show_default=True, help="License field of the dataset card.")
@_friendly
def export_(cache: str, out: str, license_: str) -> None:
    """Write CACHE as Parquet shards + dataset card that `datasets.load_dataset("parquet")` loads."""
    from mtkd_cache.ops.export import export_cache

    r = export_cache(cache, out, license=license_, storage_options=_so() or None)
    click.echo(f"exported {r.rows:,} samples to {out}: {r.files} files, {r.bytes:,} bytes of Parquet data")


@main.command("import")
@click.argument("export")
@click.argument("cache")
@_friendly
def import_(export: str, cache: str) -> None:
    """Rebuild a cache from an export made by `mtkd-cache export`."""
    from mtkd_cache.ops.export import import_cache

    r = import_cache(export, cache, storage_options=_so() or None)
    click.echo(f"imported {r.rows:,} samples into {cache}; check it with `mtkd-cache verify {cache}`")


if __name__ == "__main__":
    main()
