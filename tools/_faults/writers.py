"""Writers under stress: concurrent runs, prepare into folders that are not caches, path-like
teacher names, states a kill leaves behind, resumes with other settings, repair and migrate.

Every trial states its success criterion next to its code; see `proc.judge` for the verdicts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from tools._faults.fixtures import HEAD, VOCAB, Fixtures
from tools._faults.kill import teacher_ok
from tools._faults.ondisk import copy_tree, shard_files, tree_digest, user_files_lost
from tools._faults.proc import (
    Ctx,
    Outcome,
    Trial,
    error_line,
    finish,
    has_traceback,
    help_has,
    judge,
)

__all__ = ["partial_teacher", "writer_trials"]

INJECT_DIR = Path(__file__).with_name("inject")
Job = tuple[str, Callable[[], list[Trial]]]


def factory_run(cache: Path, name: str, **kwargs: object) -> list[str]:
    """`run` of the `fault_factories:lm` factory teacher, top-8."""
    kw = {"width": HEAD, "vocab": VOCAB, "padded": HEAD, "seed": 3, **kwargs}
    return ["run", str(cache), "--teacher", name, "--model", "fault_factories:lm", "--model-kwargs",
            json.dumps(kw), "--top-k", "8", "--batch-size", "4", "--device", "cpu"]


def seen_teachers(ctx: Ctx, cache: Path) -> tuple[set[str], Outcome]:
    """The teachers a reader of `cache` sees (`mtkd-cache inspect --json`)."""
    out = ctx.run("cache", ["inspect", str(cache), "--json", "--max-chunks", "1"])
    try:
        return set(json.loads(out.stdout).get("teachers") or {}), out
    except json.JSONDecodeError:
        return set(), out


def _together(ctx: Ctx, runs: list[list[str]], env: dict[str, str]) -> list[Outcome]:
    t0 = time.monotonic()
    procs = [ctx.spawn("cache", args, env=env) for args in runs]
    return [finish(p, t0, ctx.timeout) for p in procs]


def _race(ctx: Ctx, fx: Fixtures, folder: Path, delay: float) -> list[Trial]:
    """Two teachers registering at once must both be readable afterwards (or one refused in one line)."""
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    env = ctx.env({"FAULTS_IO_DELAY": f"manifest.json:{delay}"}, first_paths=[INJECT_DIR])
    outs = _together(ctx, [factory_run(cache, "t1", seed=1), factory_run(cache, "t2", seed=2)], env)
    seen, inspect = seen_teachers(ctx, cache)
    ok = [o.rc == 0 for o in outs]
    lost = [n for n, good in zip(("t1", "t2"), ok) if good and n not in seen]
    what = f"exits {[o.rc for o in outs]}, reader sees {sorted(seen)} (injected delay {delay} s on manifest.json)"
    if any(o.timed_out for o in outs):
        verdict = "hang"
    elif any(has_traceback(o) for o in [*outs, inspect]):
        verdict, what = "traceback", what + "; " + next(o.brief() for o in outs if has_traceback(o))
    elif inspect.rc != 0:
        verdict, what = "wrong-outcome", f"{what}; inspect {inspect.brief()}"
    elif lost:
        verdict, what = "silent-wrong", f"{what}; {lost} exited 0 but are lost"
    elif not all(ok) and not all(error_line(o) for o, good in zip(outs, ok) if not good):
        verdict = "wrong-outcome"
    else:
        verdict = "clean"
    return [Trial("concurrent registration of two teachers", verdict, what, sum(o.seconds for o in outs))]


def _identical(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """The same run started twice at once: one may lose with a one-line error; the data must be right."""
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    outs = _together(ctx, [fx.kill_run_args(cache), fx.kill_run_args(cache)], ctx.env())
    ok, why = teacher_ok(cache, fx.kill_ref, "f")
    what = f"exits {[o.rc for o in outs]}" + "".join(f"; {o.brief()}" for o in outs if o.rc) + (f"; {why}" if why else "")
    if any(o.timed_out for o in outs):
        verdict = "hang"
    elif any(has_traceback(o) for o in outs):
        verdict = "traceback"
    elif not any(o.rc == 0 for o in outs):
        verdict = "wrong-outcome"
    elif not ok:
        verdict = "silent-wrong"
    else:
        verdict = "clean" if all(o.rc == 0 or error_line(o) for o in outs) else "wrong-outcome"
    return [Trial("two identical runs at once", verdict, what, sum(o.seconds for o in outs))]


def _user_folder(folder: Path, fx: Fixtures) -> tuple[Path, Path]:
    proj = folder / "proj"
    (proj / ".git" / "objects").mkdir(parents=True)
    (proj / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (proj / ".git" / "objects" / "ab12").write_bytes(b"\x00blob")
    (proj / "README.md").write_text("my project\n")
    (proj / "data").mkdir()
    data = proj / "data" / "corpus.jsonl"
    shutil.copy(fx.corpus, data)
    return proj, data


def _prepare_foreign(ctx: Ctx, fx: Fixtures, folder: Path, overwrite: bool) -> list[Trial]:
    """prepare into a folder holding .git and the data file: nothing may be deleted; refuse (or, with
    --overwrite, at least delete nothing that mtkd did not write)."""
    proj, data = _user_folder(folder, fx)
    before = tree_digest(proj)
    args = [*fx.prepare_args(proj, data, 8), *(["--overwrite"] if overwrite else [])]
    out = ctx.run("cache", args)
    verdict, what = judge(out, correct=True, must_fail=not overwrite, lost=user_files_lost(before, proj))
    case = "prepare into a non-cache folder (.git + data inside)" + (" --overwrite" if overwrite else "")
    return [Trial(case, verdict, what, out.seconds)]


def _overwrite_cache(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """--overwrite of a real cache that also holds user files and the new data source: keep them."""
    cache = copy_tree(fx.main, folder / "cache")
    (cache / "NOTES.md").write_text("do not delete\n")
    (cache / "mydata").mkdir()
    data = cache / "mydata" / "corpus.jsonl"
    shutil.copy(fx.corpus, data)
    before = {k: v for k, v in tree_digest(cache).items() if k in ("NOTES.md", "mydata/corpus.jsonl")}
    args = [*fx.prepare_args(cache, data, 8), "--overwrite"]
    args[args.index("--max-length") + 1] = "12"
    out = ctx.run("cache", args)
    verdict, what = judge(out, correct=True, lost=user_files_lost(before, cache))
    return [Trial("prepare --overwrite of a cache holding user files and the data", verdict, what, out.seconds)]


def _path_name(ctx: Ctx, fx: Fixtures, folder: Path, name: str) -> list[Trial]:
    """A path-like --teacher must be refused in one line and must not create anything anywhere."""
    cache = copy_tree(fx.kill_inputs, folder / "cache")
    name = str(folder / "abs_teacher") if name == "<absolute>" else name
    before = {str(p.relative_to(folder)) for p in folder.rglob("*")}
    out = ctx.run("cache", factory_run(cache, name), cwd=folder)
    harmless = {"cache/teachers", "cache/teachers/zarr.json"}  # the (empty) group every teacher lives in
    stray = sorted({str(p.relative_to(folder)) for p in folder.rglob("*")} - before - harmless)
    verdict, what = judge(out, correct=False, must_fail=True)
    if stray and verdict == "clean":
        verdict = "wrong-outcome"
    what += f"; {len(stray)} new path(s): {stray[:3]}" if stray else "; nothing created"
    return [Trial("path-like teacher name", verdict, f"--teacher {name!r}: {what}", out.seconds)]


def partial_teacher(cache: Path, name: str, keep: Callable[[Path], bool]) -> str:
    """Make a finished teacher look like a killed run: no teacher.json, not in the manifest, and
    (v1 layout) only the files `keep` accepts. Returns what was removed."""
    folder = cache / "teachers" / name
    (folder / "teacher.json").unlink(missing_ok=True)
    manifest = json.loads((cache / "manifest.json").read_text())
    if name in manifest.get("teachers", []):
        manifest["teachers"].remove(name)
        (cache / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    removed = [p for p in sorted(folder.rglob("*")) if p.is_file() and not keep(p.relative_to(folder))]
    for p in removed:
        p.unlink()
    return f"removed teacher.json, the manifest entry and {len(removed)} file(s)"


def _stuck_values(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """State of a kill after `indices` was created and before `values`: the same command must finish it."""
    cache = copy_tree(fx.main, folder / "cache")
    note = partial_teacher(cache, "a", lambda p: p.name == "_run.json" or str(p) in ("zarr.json", "indices/zarr.json"))
    out = ctx.run("cache", ["run", str(cache), "--teacher", "a", "--model", str(fx.teacher_a), "--top-k", "8",
                            "--features", "-1", "--device", "cpu"])
    verdict, what = judge(out, correct=lambda: teacher_ok(cache, fx.main, "a"), may_fail=False)
    return [Trial("rerun after a kill between creating indices and values", verdict, f"{note}; rerun {what}",
                  out.seconds)]


def _half_commits(p: Path) -> bool:
    """keep(): every file but the commit markers of the second half of the chunks."""
    return not (p.parts[0] == "_commits" and p.stem.isdigit() and int(p.stem) >= 12)


def _other_kwargs(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """Resuming a half-done factory run with other --model-kwargs must be refused (else mixed teacher)."""
    cache = copy_tree(fx.kill_ref, folder / "cache")
    note = partial_teacher(cache, "f", _half_commits)
    args = fx.kill_run_args(cache)
    # Same weights, other outputs: only the recorded kwargs can tell the two models apart.
    args[args.index("--model-kwargs") + 1] = json.dumps({"width": HEAD, "vocab": VOCAB, "padded": HEAD, "seed": 3,
                                                         "scale": 3.0})
    out = ctx.run("cache", args)
    verdict, what = judge(out, correct=False, must_fail=True, names=["kwargs"])
    return [Trial("resume with other --model-kwargs", verdict, f"{note}; rerun {what}", out.seconds)]


def _relative_model(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """Resuming with --model ./teacher_a where the run used an absolute path is the same model."""
    cache = copy_tree(fx.main, folder / "cache")
    note = partial_teacher(cache, "a", lambda p: not (p.parts[0] == "_commits" and p.stem.isdigit() and int(p.stem) >= 3))
    out = ctx.run("cache", ["run", str(cache), "--teacher", "a", "--model", f"./{fx.teacher_a.name}", "--top-k", "8",
                            "--features", "-1", "--device", "cpu"], cwd=fx.teacher_a.parent)
    verdict, what = judge(out, correct=lambda: teacher_ok(cache, fx.main, "a"), may_fail=False)
    return [Trial("resume with --model ./a for /abs/a", verdict, f"{note}; rerun {what}", out.seconds)]


def _repair(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """verify --repair, then the same run, recomputes the damaged chunk: the teacher is whole again."""
    case = "verify --repair, then run again"
    if not help_has(ctx, "cache", ["verify", "--repair"]):
        return [Trial(case, "wrong-outcome", "not available yet: `mtkd-cache verify --help` has no --repair")]
    cache = copy_tree(fx.main, folder / "cache")
    shard_files(cache / "teachers" / "a" / "values")[2].unlink()
    steps = [["verify", str(cache), "--repair"],
             ["run", str(cache), "--teacher", "a", "--model", str(fx.teacher_a), "--top-k", "8", "--features", "-1",
              "--device", "cpu"], ["verify", str(cache)]]
    outs = [ctx.run("cache", s) for s in steps]
    verdict, what = judge(outs[-1], correct=lambda: teacher_ok(cache, fx.main, "a"), may_fail=False)
    return [Trial(case, verdict, f"repair {outs[0].brief()}; run {outs[1].brief()}; verify {what}",
                  sum(o.seconds for o in outs))]


def _migrate(ctx: Ctx, fx: Fixtures, folder: Path) -> list[Trial]:
    """`mtkd-cache migrate` exists; on a current cache it changes no data."""
    case = "mtkd-cache migrate"
    if not help_has(ctx, "cache", ["migrate"]):
        return [Trial(case, "wrong-outcome", "not available yet: `mtkd-cache --help` lists no migrate command")]
    cache = copy_tree(fx.main, folder / "cache")
    out = ctx.run("cache", ["migrate", str(cache)])
    verdict, what = judge(out, correct=lambda: teacher_ok(cache, fx.main, "a"))
    return [Trial(case, verdict, f"migrate of a current cache: {what}", out.seconds)]


def writer_trials(ctx: Ctx, fx: Fixtures, races: int) -> list[Job]:
    root = ctx.work / "writers"
    jobs: list[Job] = [(f"race-{i}", partial(_race, ctx, fx, root / f"race-{i}", 1.0 if i % 2 == 0 else 0.0))
                       for i in range(races)]
    jobs += [(f"identical-runs-{i}", partial(_identical, ctx, fx, root / f"identical-{i}")) for i in range(2)]
    for overwrite in (False, True):
        jobs.append((f"prepare-foreign-{overwrite}", partial(_prepare_foreign, ctx, fx, root / f"foreign-{overwrite}",
                                                             overwrite)))
    jobs.append(("prepare-overwrite-user-files", partial(_overwrite_cache, ctx, fx, root / "overwrite")))
    for i, name in enumerate(("a\\..\\b", "../x", "a/b", "..", "<absolute>")):
        jobs.append((f"name-{i}", partial(_path_name, ctx, fx, root / f"name-{i}", name)))
    for key, fn in (("stuck-values", _stuck_values), ("resume-kwargs", _other_kwargs),
                    ("resume-relative-model", _relative_model), ("verify-repair", _repair), ("migrate", _migrate)):
        jobs.append((key, partial(fn, ctx, fx, root / key)))
    return jobs
