"""The language-model experiment of issue 13, step by step; every step is resumable and cached.

    python -m examples.lm data                      # three domains, train/held-out splits
    python -m examples.lm specialist --domain kjv   # SmolLM2 fine-tuned on one domain
    python -m examples.lm teachers                  # teachers' held-out bits per byte, per domain
    python -m examples.lm caches                    # transfer/eval/curve data + `mtkd-cache prepare`
    python -m examples.lm scores                    # `mtkd-score` of the teachers on the eval cache
    python -m examples.lm students [--phase base]   # the student matrix (resumable), then `report`
    python -m examples.lm report                    # tables, lm_students.json, lm_curve.png
    python -m examples.lm predict --root R          # target NLL vs student perplexity (Spearman)

The work folder is ``$MTKD_LM_WORK`` (default ``runs/lm``); results also go to
``benchmarks/results/lm_teachers.json``, ``lm_scores.json`` and ``lm_students.json``. The teachers
are cached with the real CLI (``mtkd-cache run``, one teacher at a time; see benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from examples.lm.domains import DOMAINS, write_domains
from examples.lm.models import model_dir
from examples.lm.perplexity import heldout_bits_per_byte
from examples.lm.specialist import SpecialistConfig, train_specialist
from examples.lm.students_cli import caches, predict, report, scores, students

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "lm_teachers.json"


def _work() -> Path:
    return Path(os.environ.get("MTKD_LM_WORK", "runs/lm"))


@click.group()
def main() -> None:
    """Language-model experiment: real teachers, three domains, held-out splits."""


@main.command()
def data() -> None:
    """Write the three domains' train/held-out splits under WORK/data."""
    summary = write_domains(_work() / "data")
    for name, s in summary.items():
        click.echo(f"{name:22s} {s['segments']:5d} segments {s['chars']:8d} chars from {s['sources']} sources")


@main.command()
@click.option("--domain", type=click.Choice(DOMAINS), required=True, help="Domain to specialise on.")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Passes over the domain's train split.")
@click.option("--lr", type=float, default=5e-5, show_default=True, help="Peak learning rate (AdamW).")
def specialist(domain: str, epochs: float, lr: float) -> None:
    """Fine-tune SmolLM2-135M on one domain (resumes an interrupted run)."""
    work = _work()
    out = train_specialist(model_dir(work, "smollm2"), work / "data", work / "models" / f"smollm2-{domain}",
                           work / f"specialist-{domain}", SpecialistConfig(domain, epochs=epochs, lr=lr))
    click.echo(f"specialist saved to {out}")


@main.command()
@click.option("--teacher", "teachers", multiple=True, default=("smollm2", "gemma3"), show_default=True,
              help="Teacher to score (repeat); smollm2-<domain> for a specialist.")
@click.option("--max-segments", type=int, default=None, help="Score only the first N held-out segments per domain.")
def teachers(teachers: tuple[str, ...], max_segments: int | None) -> None:
    """Held-out bits per byte of each teacher on each domain (cached per teacher and domain)."""
    work = _work()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in teachers:
        path = model_dir(work, name)
        for domain in DOMAINS:
            key = f"{name}/{domain}"
            if key in results and results[key].get("max_segments") == max_segments:
                continue
            results[key] = {**heldout_bits_per_byte(path, work / "data", domain, max_segments=max_segments),
                            "max_segments": max_segments}
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    click.echo(f"{'teacher/domain':28s} {'bits/byte':>9s} {'tok ppl':>8s}")
    for key, r in sorted(results.items()):
        click.echo(f"{key:28s} {r['bits_per_byte']:9.4f} {r['token_perplexity']:8.2f}")


for _command in (caches, scores, students, report, predict):
    main.add_command(_command)

if __name__ == "__main__":
    main()
