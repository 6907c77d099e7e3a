"""Bad or unusual teachers: non-finite logits, outputs narrower or wider than the tokenizer, and
model folders that carry code.

Success criteria: NaN for some samples is refused in one line that names every bad sample id;
NaN only in padded (ignored) vocabulary columns is accepted and stored finite; a narrower output
is refused in one line; a wider one is refused, or stored with every index inside the tokenizer's
vocabulary; a model folder with remote code is not imported without --trust-remote-code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from tools._faults.fixtures import HEAD, VOCAB, Fixtures
from tools._faults.ondisk import arrays_under, copy_tree
from tools._faults.proc import Ctx, Trial, judge
from tools._faults.writers import factory_run

__all__ = ["bad_teacher_trials", "first_tokens"]

Job = tuple[str, Callable[[], list[Trial]]]
MARKER_CODE = '''import pathlib
pathlib.Path(__file__).with_name("MARKER").write_text("code from the folder ran")
'''


def first_tokens(cache: Path) -> dict[int, int]:
    """sample id -> its first token id, read from samples.parquet and inputs/token_ids."""
    import pyarrow.parquet as pq
    import zarr

    table = pq.read_table(cache / "inputs" / "samples.parquet", columns=["sample_id", "offset"]).to_pydict()
    ids = np.asarray(zarr.open_array(str(cache / "inputs" / "token_ids"), mode="r")[:])
    return {int(s): int(ids[o]) for s, o in zip(table["sample_id"], table["offset"])}


def _nan_samples(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    firsts = first_tokens(cache)
    counts: dict[int, int] = {}
    for tok in firsts.values():
        counts[tok] = counts.get(tok, 0) + 1
    bad_tokens = sorted(counts, key=lambda t: (-counts[t], t))[:3]
    bad = sorted(s for s, t in firsts.items() if t in bad_tokens)
    out = ctx.run("cache", factory_run(cache, "nan", nan_first_tokens=bad_tokens))
    named = [s for s in bad if re.search(rf"(?<!\d){s}(?!\d)", out.stderr)]
    verdict, what = judge(out, correct=False, must_fail=True)
    if verdict == "clean" and len(named) < len(bad):
        verdict = "wrong-outcome"
    what += f"; names {len(named)} of the {len(bad)} bad sample ids {bad}"
    return [Trial("non-finite teacher: NaN for some samples", verdict, what, out.seconds)]


def _finite_teacher(cache: Path, name: str, vocab: int) -> tuple[bool, str]:
    arrays = arrays_under(cache / "teachers" / name)
    if not arrays:
        return False, "no arrays stored"
    floats = [k for k, a in arrays.items() if a.dtype.kind == "f" and not np.isfinite(a).all()]
    indices = arrays.get("indices")
    top = -1 if indices is None else int(indices.max())
    too_big = top >= vocab
    meta = json.loads((cache / "teachers" / name / "teacher.json").read_text())
    if floats or too_big or meta.get("vocab_size") != vocab:
        return False, (f"non-finite {floats}; " if floats else "") + (
            f"indices up to {top} >= tokenizer {vocab}; " if too_big else "") + \
            f"teacher.json vocab_size {meta.get('vocab_size')}"
    return True, ""


def _nan_padding(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    out = ctx.run("cache", factory_run(cache, "padnan", nan_padding=True))
    verdict, what = judge(out, correct=lambda: _finite_teacher(cache, "padnan", VOCAB), may_fail=False)
    return [Trial("non-finite teacher: NaN only in padded vocab columns", verdict, what, out.seconds)]


def _width(ctx: Ctx, fx: Fixtures, folder: Path, width: int) -> list[Trial]:
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    out = ctx.run("cache", factory_run(cache, "w", width=width, vocab=width, padded=None))
    if width < VOCAB:
        verdict, what = judge(out, correct=False, must_fail=True)
        case = f"factory output narrower than the tokenizer ({width} < {VOCAB})"
    else:
        verdict, what = judge(out, correct=lambda: _finite_teacher(cache, "w", VOCAB))
        case = f"factory output wider than the tokenizer ({width} > {VOCAB}), no padding declared"
    return [Trial(case, verdict, what, out.seconds)]


def _remote_code_teacher(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """A teacher folder whose config.json maps to code in the folder: never imported without the flag."""
    model = Path(copy_tree(fx.teacher_a, folder / "model"))
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilLM", "AutoConfig": "evil_model.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config, indent=2))
    (model / "evil_model.py").write_text(MARKER_CODE)
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    out = ctx.run("cache", ["run", str(cache), "--teacher", "r", "--model", str(model), "--top-k", "4", "--device",
                            "cpu"])
    ran = (model / "MARKER").exists()
    verdict, what = judge(out, correct=True)
    if ran:
        verdict, what = "silent-wrong", f"{what}; code from the model folder ran (marker written)"
    return [Trial("code-bearing teacher folder (auto_map, no --trust-remote-code)", verdict, what, out.seconds)]


def bad_teacher_trials(ctx: Ctx, fx: Fixtures) -> list[Job]:
    root = ctx.work / "teachers"
    jobs: list[Job] = [("nan-samples", partial(_nan_samples, ctx, fx, root / "nan")),
                       ("nan-padding", partial(_nan_padding, ctx, fx, root / "padnan")),
                       ("remote-code-teacher", partial(_remote_code_teacher, ctx, fx, root / "remote"))]
    for width in (VOCAB - 8, HEAD + 8):
        jobs.append((f"width-{width}", partial(_width, ctx, fx, root / f"width-{width}", width)))
    return jobs
