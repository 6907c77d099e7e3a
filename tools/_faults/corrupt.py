"""Damaged caches: flipped bytes in every array kind and every Parquet/JSON file, deleted and
truncated shards, edited metadata. The consumer is the reference training run (it reads every
chunk of every array of `main` twice); `verify` is asked too for a few kinds.

Verdict: training must either refuse with a one-line error naming the damaged array or file, or
produce per-step losses and final weights equal to the undamaged reference. Every trial first
proves the damage is real: the file's bytes changed, and (arrays) whether the decoded array
changed or no longer decodes is recorded.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tools._faults.fixtures import Fixtures, train_args
from tools._faults.kill import train_same
from tools._faults.ondisk import copy_tree, flip_byte, shard_files
from tools._faults.proc import Ctx, Outcome, Trial, judge

__all__ = ["corruption_trials"]

ARRAYS = {
    "indices (uint16, top-k)": "teachers/a/indices",
    "values (u8log)": "teachers/a/values",
    "values (fp16)": "teachers/b/values",
    "tail (fp16)": "teachers/a/tail",
    "features (fp16)": "teachers/a/features/layer_m1",
    "features (int8)": "teachers/b/features/layer_m1",
    "features int8 scale": "teachers/b/features/layer_m1_scale",
    "counts (sampled targets)": "teachers/s/counts",
    "inputs token_ids": "inputs/token_ids",
}
FILES = ["manifest.json", "inputs/inputs.json", "inputs/samples.parquet", "inputs/chunks.parquet",
         "inputs/tokenizer/tokenizer.json", "teachers/a/teacher.json", "teachers/a/chunks.parquet",
         "teachers/b/teacher.json", "teachers/s/chunks.parquet", "teachers/a/values/zarr.json",
         "inputs/token_ids/zarr.json", "teachers/a/_commits/00000001.json", "teachers/a/_run.json"]
Job = tuple[str, Callable[[], list[Trial]]]


def _decoded(array_dir: Path) -> np.ndarray | str:
    import zarr

    try:
        return np.asarray(zarr.open_array(str(array_dir), mode="r")[:])
    except Exception as e:  # any codec error means "no longer decodes"
        return f"{type(e).__name__}"


def _decode_state(before: np.ndarray | str, array_dir: Path) -> str:
    after = _decoded(array_dir)
    if isinstance(after, str):
        return f"no longer decodes ({after})"
    if isinstance(before, str) or before.tobytes() != after.tobytes():
        n = "?" if isinstance(before, str) or before.shape != after.shape else int(np.sum(before != after))
        return f"decodes to different data ({n} element(s))"
    return "decodes to the same data"


def _train_trial(ctx: Ctx, fx: Fixtures, case: str, cache: Path, damage: str, names: list[str],
                 facts: dict[str, object]) -> Trial:
    run = cache.parent / "run"
    out = ctx.run("train", train_args(fx, cache, run))
    verdict, what = judge(out, correct=lambda: train_same(run, fx.ref_train), names=names)
    return Trial(case, verdict, f"{damage}; train {what}", out.seconds, facts)


def _array_job(ctx: Ctx, fx: Fixtures, kind: str, key: str, how: str, folder: Path, seed: int) -> list[Trial]:
    cache = copy_tree(fx.main, folder / "cache")
    array_dir = cache / key
    shards = shard_files(array_dir)
    case = {"flip": f"flipped byte: {kind}", "delete": "deleted shard", "truncate": "truncated shard"}[how]
    if not shards:
        return [Trial(case, "skipped", f"{key} has no shard files in this layout")]
    rng = random.Random(seed)
    shard = rng.choice(shards)
    before = _decoded(array_dir)
    rel = str(shard.relative_to(cache))
    if how == "flip":
        offset, old, new = flip_byte(shard, rng)
        damage = f"{rel} byte {offset} {old:#04x}->{new:#04x}"
    elif how == "delete":
        shard.unlink()
        damage = f"deleted {rel}"
    else:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
        damage = f"truncated {rel} to {len(data) // 2} of {len(data)} bytes"
    state = _decode_state(before, array_dir)
    if how != "flip":
        case = f"{case}: {kind}"
    name = key.rsplit("/", 1)[-1]
    return [_train_trial(ctx, fx, case, cache, f"{damage}, {state}", [name, rel], {"decoded": state})]


def edit_digit(path: Path, rng: random.Random) -> str:
    """Change one digit of a JSON file to another digit (still valid JSON, another value)."""
    text = path.read_text()
    spots = [m.start() for m in re.finditer(r"[0-9]", text)]
    i = rng.choice(spots)
    new = str((int(text[i]) + rng.randrange(1, 10)) % 10)
    path.write_text(text[:i] + new + text[i + 1:])
    return f"digit at {i} {text[i]}->{new} ({text[max(0, i - 24): i + 6]!r})"


def _file_job(ctx: Ctx, fx: Fixtures, key: str, how: str, folder: Path, seed: int) -> list[Trial]:
    cache = copy_tree(fx.main, folder / "cache")
    path = cache / key
    kind = re.sub(r"teachers/[^/]+/", "teachers/<t>/", re.sub(r"/\d{8}\.json$", "/<chunk>.json", key))
    case = f"{'flipped byte' if how == 'flip' else 'edited digit'}: {kind}"
    if not path.is_file():
        return [Trial(case, "skipped", f"{key} does not exist in this layout")]
    before = path.read_bytes()
    table = _table(path)
    rng = random.Random(seed)
    if how == "flip":
        # Parquet: stay out of the footer, which only breaks the file; the data pages are the test.
        offset, old, new = flip_byte(path, rng, hi=0.8 if path.suffix == ".parquet" else 1.0)
        damage = f"{key} byte {offset} {old:#04x}->{new:#04x}"
    else:
        damage = f"{key} {edit_digit(path, rng)}"
    assert path.read_bytes() != before
    if table is not None:
        after = _table(path)
        damage += ", " + ("no longer decodes" if after is None else "decodes to the same table" if after.equals(table)
                          else "decodes to a different table")
    return [_train_trial(ctx, fx, case, cache, damage, [path.name, key], {})]


def _table(path: Path) -> Any:
    """The decoded Parquet table (None if it does not decode, or is not Parquet)."""
    if path.suffix != ".parquet":
        return None
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception:  # any pyarrow error: the file no longer decodes
        return None


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _semantic(fx: Fixtures, folder: Path, which: str) -> tuple[Path, str, list[str]]:
    cache = copy_tree(fx.main, folder / "cache")
    if which == "step":
        _edit_json(cache / "teachers/a/teacher.json", lambda v: v["values"].__setitem__("step", v["values"]["step"] * 2))
        return cache, "teachers/a/teacher.json values.step doubled", ["teacher.json", "'a'"]
    if which == "name":
        _edit_json(cache / "teachers/b/teacher.json", lambda v: v.__setitem__("name", "a"))
        return cache, "teachers/b/teacher.json name set to 'a'", ["teacher.json", "'b'"]
    shard = shard_files(cache / "teachers/a/values")[1]
    flip_byte(shard, random.Random(5))
    return cache, f"flipped a byte of {shard.relative_to(cache)}", ["values"]


def _semantic_job(ctx: Ctx, fx: Fixtures, which: str, folder: Path) -> list[Trial]:
    cache, damage, names = _semantic(fx, folder, which)
    case = {"step": "teacher.json values.step edited", "name": "teacher.json name differs from its folder",
            "flip": "flipped byte: values (u8log)"}[which]
    return [_train_trial(ctx, fx, case, cache, damage, names, {})]


def _verify_job(ctx: Ctx, fx: Fixtures, which: str, folder: Path) -> list[Trial]:
    cache, damage, names = _semantic(fx, folder, which)
    out: Outcome = ctx.run("cache", ["verify", str(cache)])
    verdict, what = judge(out, correct=False, must_fail=True, names=names)
    return [Trial(f"verify after damage: {which}", verdict, f"{damage}; verify {what}", out.seconds)]


def corruption_trials(ctx: Ctx, fx: Fixtures, flips_per_kind: int, seed: int) -> list[Job]:
    """Every damage trial as (name, thunk); `flips_per_kind` random flips per array kind."""
    root = ctx.work / "corrupt"
    jobs: list[Job] = []
    for k, (kind, key) in enumerate(ARRAYS.items()):
        for i in range(flips_per_kind):
            name = f"flip-{k}-{i}"
            jobs.append((name, partial(_array_job, ctx, fx, kind, key, "flip", root / name, seed + 100 * k + i)))
    damaged = [("delete", ("values (u8log)", "inputs token_ids", "features (int8)")),
               ("truncate", ("indices (uint16, top-k)", "tail (fp16)", "counts (sampled targets)"))]
    for how, kinds in damaged:
        for k, kind in enumerate(kinds):
            name = f"{how}-{k}"
            jobs.append((name, partial(_array_job, ctx, fx, kind, ARRAYS[kind], how, root / name, seed + 7 * k)))
    for k, key in enumerate(FILES):
        hows = ("flip", "digit") if key.endswith(".json") and flips_per_kind > 1 else ("flip",)
        for how in hows:
            name = f"file-{how}-{k}"
            jobs.append((name, partial(_file_job, ctx, fx, key, how, root / name, seed + 13 * k)))
    for which in ("step", "name"):
        jobs.append((f"semantic-{which}", partial(_semantic_job, ctx, fx, which, root / f"semantic-{which}")))
    for which in ("flip", "step", "name"):
        jobs.append((f"verify-{which}", partial(_verify_job, ctx, fx, which, root / f"verify-{which}")))
    return jobs
