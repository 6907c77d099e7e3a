"""The precompute's O(V) reductions alone, this checkout against another, on a real teacher's logits (issue 9).

    python -m benchmarks.reduce_ab --base BASE_CHECKOUT --model-dir SMOLLM2_DIR --rounds 9

`precompute_overhead` times whole runs, whose bare forward varies by ±15% from pair to pair on a
shared 2-core machine, so a change to the reductions alone is lost in it. This times only what a
top-k run does per batch after the forward, on one thread and in interleaved rounds:

* this checkout: `extract.topk_targets_checked` (top-k, tail, entropy, top-1, finiteness in one pass);
* `--base`: the same file of another checkout (e.g. a `git worktree` of an older commit), loaded as
  a module of its own; it runs `topk_targets_checked` where it has it, else `nonfinite_samples`
  followed by `topk_targets_with_stats` (what `chunk._reduce` did before).

The logits are the teacher's on the first held-out segments of `--data` (4 x 256 tokens of
Shakespeare, KJV and Python docs from the issue-13 data folder), float32. Outputs are compared
first (equal, or their largest absolute difference). Reported: CPU ns per logit of each (median
over rounds) and new / base.

With `--in-run N`, whole `run_teacher` calls over N samples (two intra-op threads and two reduction
workers, as a run on this machine) come first, with each checkout's `topk_targets_checked` swapped
into the runner, interleaved: the workers' CPU seconds are the reductions' cost where they compete
with the LM head for the cores.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import torch

from mtkd_cache.precompute import extract

RESULTS = Path(__file__).parent / "results" / "reduce_ab.json"


def load_base(checkout: Path) -> ModuleType:
    path = checkout / "mtkd_cache" / "precompute" / "extract.py"
    if not path.is_file():
        raise click.BadParameter(f"{path} does not exist; pass a checkout of mtkd (e.g. a git worktree)")
    spec = importlib.util.spec_from_file_location("mtkd_base_extract", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teacher_logits(model_dir: Path, data: Path, rows: int, length: int) -> torch.Tensor:
    """(rows, length, V) float32 logits of the teacher on the first held-out segments of each domain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seqs = []
    for name in ("shakespeare", "kjv", "pydocs"):
        for line in (data / f"{name}.heldout.jsonl").read_text().splitlines()[:3]:
            ids = tok(json.loads(line)["text"][: 8 * length], return_tensors="pt").input_ids[0, :length]
            if len(ids) == length:
                seqs.append(ids)
    if len(seqs) < rows:
        raise click.BadParameter(f"{data} gave {len(seqs)} segments of {length} tokens; need {rows}")
    with torch.inference_mode():
        return model(input_ids=torch.stack(seqs[:rows])).logits.float()


def reducer(module: ModuleType, logits: torch.Tensor, k: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    vocab = logits.shape[-1]
    if hasattr(module, "topk_targets_checked"):
        return lambda: tuple(module.topk_targets_checked(logits, k, 1.0, vocab)[1])

    def separate() -> tuple[torch.Tensor, ...]:
        module.nonfinite_samples(logits, vocab_size=vocab)
        return tuple(module.topk_targets_with_stats(logits, k, 1.0, vocab))

    return separate


def in_run(base: ModuleType, model_dir: Path, samples: int, rounds: int) -> dict[str, Any]:
    """Whole `run_teacher` calls (`precompute_overhead.time_run`, instrumented) with the top-k pass of each
    checkout swapped in, interleaved: the reduction workers' CPU seconds, the main thread's head + wait, the run."""
    from benchmarks import precompute_overhead as overhead
    from mtkd_cache.precompute import chunk
    from mtkd_cache.precompute.config import RunConfig

    cache = overhead.prepare_cache(Path(tempfile.gettempdir()) / "mtkd_reduce_ab", model_dir, max_length=256, samples=samples,
                                   chunk_samples=8)
    cfg = RunConfig(teacher=overhead._RUN_NAME, model=str(model_dir), top_k=64, batch_size=8, device="cpu",
                    dtype="fp32")
    fns = {"base": base.topk_targets_checked, "new": extract.topk_targets_checked}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in fns}
    try:
        for r in range(rounds):
            for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                chunk.topk_targets_checked = fns[name]  # type: ignore[attr-defined]
                acc = overhead.time_run(cache, cfg, stages=True)
                runs[name].append({"worker_cpu_s": acc["topk_cpu"], "head_and_wait_s": acc["head_blocks"],
                                   "pipeline_s": acc["pipeline"]})
    finally:
        chunk.topk_targets_checked = extract.topk_targets_checked  # type: ignore[attr-defined]
    med = {name: {k: statistics.median(x[k] for x in v) for k in v[0]} for name, v in runs.items()}
    return {"samples": samples, "median": med, "runs": runs,
            "new_over_base": {k: med["new"][k] / med["base"][k] for k in med["new"]}}


@click.command()
@click.option("--base", "base_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Another mtkd checkout to compare with.")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="A causal LM folder (SmolLM2-135M in the reported run).")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with {shakespeare,kjv,pydocs}.heldout.jsonl; default $MTKD_LM_WORK/data.")
@click.option("--k", default=64, show_default=True)
@click.option("--rounds", default=9, show_default=True)
@click.option("--in-run", "in_run_samples", type=int, default=0, show_default=True,
              help="Also time whole runs over this many 256-token samples (2 threads), each checkout's pass swapped in.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(base_dir: Path, model_dir: Path, data: Path | None, k: int, rounds: int, in_run_samples: int,
         out: Path) -> None:
    from examples.lm.students_cli import work  # the issue-13 work folder, $MTKD_LM_WORK

    base = load_base(base_dir)
    whole = in_run(base, model_dir, in_run_samples, rounds) if in_run_samples else None
    torch.set_num_threads(1)
    data = data or work() / "data"
    logits = teacher_logits(model_dir, data, rows=4, length=256)
    arms = {"base": reducer(base, logits, k), "new": reducer(extract, logits, k)}
    pairs = list(zip(arms["base"](), arms["new"]()))  # indices, log-probabilities, tail, entropy, top-1
    equal = [bool(torch.equal(a, b)) for a, b in pairs]
    diff = [float((a.double() - b.double()).abs().max()) for a, b in pairs]
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
            start = time.process_time()
            arms[name]()
            times[name].append((time.process_time() - start) / logits.numel() * 1e9)
    ns = {n: statistics.median(v) for n, v in times.items()}
    result = {"logits": list(logits.shape), "k": k, "outputs_equal": equal, "max_abs_diff": diff, "ns_per_logit": ns,
              "rounds": times, "new_over_base": ns["new"] / ns["base"], "in_run": whole}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    click.echo(f"outputs equal: {equal} (max abs differences {', '.join(f'{d:.1e}' for d in diff)}); "
               f"CPU ns per logit: base {ns['base']:.2f}, new {ns['new']:.2f}; new / base {ns['new'] / ns['base']:.3f}")
    if whole is not None:
        click.echo("in whole runs, new / base: " + ", ".join(f"{k} {v:.3f}" for k, v in whole["new_over_base"].items()))


if __name__ == "__main__":
    main()
