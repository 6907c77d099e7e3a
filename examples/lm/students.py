"""Students of the language-model experiment: one recipe, a resumable matrix of (config, seed) runs.

Every run trains the same small Llama (SmolLM2's tokenizer and vocabulary, random init from the
seed) through mtkd_train's Python API (``TrainConfig`` + ``DistillRecipe``, what ``mtkd-train``
runs) on the transfer cache, evaluating on the ``curve`` cache (a quarter of the held-out split)
every ``eval_every`` steps. When it ends, the saved student is scored on the whole held-out eval
cache per domain, and one JSON per (config, seed) is written atomically under ``WORK/students/``.

Resumable at two levels: a finished (config, seed) whose JSON holds the same recipe is skipped; an
interrupted one continues from its newest checkpoint (``resume=True``, the trainer's own state).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ALL", "SHORT", "Recipe", "RunSpec", "base_runs", "curve_runs", "finished", "mean_spec", "operator_runs",
           "Claim", "claim_path", "claim_run", "result_path", "run_matrix", "write_result", "write_student_config"]


@dataclass(frozen=True)
class Recipe:
    """The student and its training, the same for every (config, seed) so the runs compare."""

    layers: int = 4
    """Transformer blocks of the Llama student."""
    width: int = 128
    """Hidden size (heads of 64)."""
    steps: int = 150
    """Optimizer steps: about one pass over the transfer cache (595 samples, batch 4), the most that fits
    a 2-core session for the base matrix (18 runs); the curve shows how flat each run ends."""
    batch_size: int = 4
    """Samples (of up to 512 tokens, ~350 on average) per step."""
    lr: float = 2e-3
    """Peak learning rate (AdamW, warm-up then cosine to 10%)."""
    alpha: float = 0.5
    """KD weight: loss = alpha * KD + (1 - alpha) * CE (no-KD runs use 0)."""
    temperature: float = 1.0
    """KD temperature."""
    eval_every: int = 30
    """Steps between held-out evaluations on the curve cache."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RunSpec:
    """One configuration of the matrix: which teachers, which operator, KD or not."""

    name: str
    teachers: tuple[str, ...]
    aggregate: str = "mean"
    aggregate_kwargs: Mapping[str, Any] = field(default_factory=dict)
    kd: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "teachers": list(self.teachers), "aggregate": self.aggregate,
                "aggregate_kwargs": dict(self.aggregate_kwargs), "kd": self.kd}


ALL = ("smollm2", "gemma3", "smollm2-shakespeare")
"""The teachers, in the fixed order of the 1 -> N curve."""


def base_runs() -> list[RunSpec]:
    """No-KD, each teacher alone, the mean of all three and of the two generalists."""
    return [
        RunSpec("nokd", ("smollm2",), kd=False),  # the teacher is listed but alpha = 0: CE only
        RunSpec("smollm2", ("smollm2",)),
        RunSpec("gemma3", ("gemma3",)),
        RunSpec("specialist", ("smollm2-shakespeare",)),
        RunSpec("mean-all", ALL),
        RunSpec("mean-smollm2+gemma3", ("smollm2", "gemma3")),
    ]


def operator_runs(route: Mapping[str, str]) -> list[RunSpec]:
    """`auto` (the operator and weights `mtkd-score` picks on the held-out curve cache before step 0),
    then every other operator over all three teachers; `route` maps each domain to its routed teacher."""
    return [RunSpec("auto-all", ALL, "auto")] + [
        RunSpec(f"{op}-all", ALL, op) for op in ("entropy", "confidence", "loglinear", "gate", "mtbkd")] + [
        RunSpec("routing-all", ALL, "routing", {"domain_to_teacher": dict(route)})]


def curve_runs(single_ppl: Mapping[str, float]) -> list[RunSpec]:
    """The 1 -> N curve with `mean`: in the fixed order ALL, and best first by single-teacher student perplexity.

    `single_ppl` maps a teacher to the held-out perplexity of its single-teacher student; runs
    whose teacher set is already in the matrix (the prefixes of the fixed order are) share its name.
    """
    best = sorted(ALL, key=lambda t: single_ppl.get(t, float("inf")))
    runs = {}
    for order in (ALL, tuple(best)):
        for n in range(2, len(order) + 1):
            spec = mean_spec(order[:n])
            runs[spec.name] = spec
    return list(runs.values())


SHORT = {"smollm2": "smollm2", "gemma3": "gemma3", "smollm2-shakespeare": "specialist"}
"""Each teacher's name in config names (its single-teacher config is called so)."""


def mean_spec(teachers: tuple[str, ...]) -> RunSpec:
    """The `mean` config over a set of teachers, named after the set (the same name in any order)."""
    if set(teachers) == set(ALL):
        return RunSpec("mean-all", ALL)
    ordered = tuple(t for t in ALL if t in teachers)  # one name per set, whatever the order
    return RunSpec("mean-" + "+".join(SHORT[t] for t in ordered), ordered)


def result_path(root: Path, spec: RunSpec, seed: int) -> Path:
    return root / f"{spec.name}-s{seed}.json"


def finished(root: Path, spec: RunSpec, seed: int, recipe: Recipe) -> dict[str, Any] | None:
    """The stored result of (spec, seed) if it was made with this recipe and spec, else None.

    A result made with another recipe is refused, not overwritten: the matrix must not mix them.
    """
    path = result_path(root, spec, seed)
    if not path.is_file():
        return None
    res: dict[str, Any] = json.loads(path.read_text())
    if res.get("recipe") != recipe.to_dict() or res.get("spec") != spec.to_dict():
        raise ValueError(f"{path} was made with another recipe or spec ({res.get('recipe')}, {res.get('spec')}); "
                         f"move it away or keep the recipe it was made with")
    return res


def write_result(root: Path, spec: RunSpec, seed: int, result: Mapping[str, Any]) -> Path:
    """Write the result JSON atomically (a temporary file renamed into place)."""
    path = result_path(root, spec, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


Trainer = Callable[[RunSpec, int, Recipe, Path], dict[str, Any]]
"""Trains (spec, seed) with the recipe in the given run folder and returns its measurements."""


def run_matrix(root: Path, runs: Iterable[tuple[RunSpec, int]], recipe: Recipe, trainer: Trainer,
               *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run each (spec, seed) not finished yet, in order, writing its result as soon as it ends.

    A run that raises is logged and left without a result (the next call retries it), so one
    operator's refusal does not stop the matrix; an interrupt (KeyboardInterrupt) does.
    """
    results = []
    for spec, seed in runs:
        done = finished(root, spec, seed, recipe)
        if done is not None:
            log(f"skip {spec.name} s{seed}: {result_path(root, spec, seed)} exists")
            results.append(done)
            continue
        claim = claim_run(root, spec, seed)
        if claim is None:
            log(f"skip {spec.name} s{seed}: another process holds {claim_path(root, spec, seed)} (if none does, "
                f"delete that file)")
            continue
        try:
            done = finished(root, spec, seed, recipe)  # another lane may have finished it since the first check
            if done is not None:
                log(f"skip {spec.name} s{seed}: {result_path(root, spec, seed)} exists")
                results.append(done)
                continue
            log(f"run {spec.name} s{seed}")
            try:
                measured = trainer(spec, seed, recipe, root / "runs" / f"{spec.name}-s{seed}")
            except Exception as e:  # noqa: BLE001 - reported, and retried by the next call
                log(f"FAILED {spec.name} s{seed}: {type(e).__name__}: {e}")
                continue
            result = {"spec": spec.to_dict(), "seed": seed, "recipe": recipe.to_dict(), **measured}
            write_result(root, spec, seed, result)  # before the claim goes: no lane can start it again
            results.append(result)
        finally:
            claim.release()
    return results


def claim_path(root: Path, spec: RunSpec, seed: int) -> Path:
    return root / "runs" / f"{spec.name}-s{seed}.claim"


@dataclass
class Claim:
    """A held claim: the ``.claim`` file (host and pid inside) and the open descriptor whose lock holds it."""

    path: Path
    fd: int

    def release(self) -> None:
        """Delete the claim file if it is still this claim's (same inode), then drop the lock."""
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)


def claim_run(root: Path, spec: RunSpec, seed: int) -> Claim | None:
    """Claim (spec, seed) for this process, or None if a live process holds it.

    Several processes (one per core, or one per machine on a shared folder) can then work through
    one matrix: each takes the next run nobody holds. The claim is a ``.claim`` file, created
    exclusively or taken over, with an exclusive ``flock`` held on it until :meth:`Claim.release`; the lock
    goes with the process, so a killed lane does not block its run. A file that exists is taken
    over only when its lock is free *and* the host/pid written in it is gone from this host (a holder
    that writes the file without locking it is left alone while it lives). Of two processes taking
    over one dead claim, only the one that gets the lock proceeds.
    """
    path = claim_path(root, spec, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, created = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644), True
    except FileExistsError:
        try:
            fd, created = os.open(path, os.O_RDWR), False
        except FileNotFoundError:
            return None  # released in between: the next call sees the result or claims it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    try:
        same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not a file released and replaced meanwhile
    except FileNotFoundError:
        same = False
    if not same or (not created and not _stale(path)):
        os.close(fd)
        return None
    me = f"{socket.gethostname()} {os.getpid()}".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, me, 0)
    return Claim(path, fd)


def _stale(claim: Path) -> bool:
    try:
        host, pid = claim.read_text().split()
    except (FileNotFoundError, ValueError):
        return False  # gone, or being written right now: not ours to take
    if host != socket.gethostname():
        return False  # another machine's process: it cannot be checked from here
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # it exists, under another user
    return False


def write_student_config(folder: Path, recipe: Recipe, tokenizer_dir: Path) -> Path:
    """An HF Llama config (no weights: `load_student` initialises it from the seed) with SmolLM2's vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    heads = max(1, recipe.width // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=recipe.width, intermediate_size=recipe.width * 4,
                      num_hidden_layers=recipe.layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      architectures=["LlamaForCausalLM"])
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(folder))
    return folder
