"""The matrix's report: a Markdown section of docs/RELIABILITY.md and a JSON record.

A section is delimited by HTML comments carrying its title, so re-running the matrix with the same
`--title` replaces its own section and keeps the others (e.g. the baseline before fixes).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tools._faults.proc import VERDICTS, Trial

__all__ = ["summarize", "write_json", "write_markdown"]

BAD = ("silent-wrong", "data-loss", "traceback", "hang", "wrong-outcome")


def _counts(trials: list[Trial]) -> str:
    c = Counter(t.verdict for t in trials)
    return ", ".join(f"{v} {c[v]}" for v in VERDICTS if c[v])


def _what(trials: list[Trial]) -> str:
    """The distinct descriptions, failures first, shortened for one table cell."""
    ordered = [t for t in trials if t.verdict in BAD] + [t for t in trials if t.verdict not in BAD]
    seen: list[str] = []
    for t in ordered:
        text = re.sub(r"/tmp/\S+?/(?=[\w.-]+)", "…/", t.what)
        if text not in seen:
            seen.append(text)
    cell = " ‖ ".join(s[:260] for s in seen[:2]) + (f" ‖ (+{len(seen) - 2} more)" if len(seen) > 2 else "")
    kills = [t for t in trials if "mid_work" in t.facts and not t.facts.get("derived")]
    if kills:
        landed = sum(1 for t in kills if t.facts["mid_work"])
        cell = f"**{landed}/{len(kills)} kills landed mid-work.** " + cell
    decoded = Counter(str(t.facts["decoded"]).split(" (")[0] for t in trials if "decoded" in t.facts)
    if decoded:
        cell = "damage: " + ", ".join(f"{k} ×{n}" for k, n in decoded.items()) + ". " + cell
    return cell.replace("|", "\\|").replace("\n", " ")


def summarize(trials: list[Trial]) -> dict[str, Any]:
    counted = [t for t in trials if t.verdict != "skipped"]
    c = Counter(t.verdict for t in counted)
    return {"trials": len(counted), "derived": sum(1 for t in counted if t.facts.get("derived")),
            "skipped": len(trials) - len(counted), "verdicts": {v: c[v] for v in VERDICTS if v != "skipped"},
            "clean_fraction": round(c["clean"] / len(counted), 4) if counted else 0.0}


def _section(title: str, trials: list[Trial], meta: dict[str, Any]) -> str:
    cases: dict[str, list[Trial]] = {}
    for t in trials:
        cases.setdefault(t.case, []).append(t)
    s = summarize(trials)
    v = s["verdicts"]
    lines = [f"<!-- section: {title} -->", f"## {title}", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}; git commit: `{meta['commit']}`",
             f"- wall time: {meta['seconds'] / 60:.1f} min with {meta['jobs']} parallel trial(s); seed {meta['seed']}",
             f"- **{s['trials']} trials** ({s['derived']} of them extra checks on the kill runs), {s['skipped']} skipped: "
             + ", ".join(f"{k} {n}" for k, n in v.items()) + f" — {100 * s['clean_fraction']:.1f}% clean", "",
             "| case | trials | what happened | verdict |", "|---|---|---|---|"]
    for case, ts in cases.items():
        lines.append(f"| {case} | {len(ts)} | {_what(ts)} | {_counts(ts)} |")
    lines += ["", "<details><summary>Every trial</summary>", "", "| case | verdict | what happened |", "|---|---|---|"]
    for t in trials:
        what = re.sub(r"/tmp/\S+?/(?=[\w.-]+)", "…/", t.what).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {t.case} | {t.verdict} | {what[:400]} |")
    lines += ["", "</details>", f"<!-- end section: {title} -->", ""]
    return "\n".join(lines)


def write_markdown(path: Path, intro: str, title: str, trials: list[Trial], meta: dict[str, Any]) -> None:
    """Write `intro` plus every section of `path`, with this run's section replaced or added first."""
    old = path.read_text() if path.exists() else ""
    sections = re.findall(r"<!-- section: (.*?) -->\n(.*?)<!-- end section: \1 -->\n", old, flags=re.S)
    kept = [f"<!-- section: {t} -->\n{body}<!-- end section: {t} -->\n" for t, body in sections if t != title]
    path.write_text(intro.rstrip() + "\n\n" + _section(title, trials, meta) + "\n" + "\n".join(kept))


def write_json(path: Path, title: str, trials: list[Trial], meta: dict[str, Any]) -> None:
    """Keep one record per title in `path` (a JSON object keyed by section title)."""
    try:
        runs = json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        runs = {}
    runs[title] = {**meta, "summary": summarize(trials),
                   "trials": [{"case": t.case, "verdict": t.verdict, "what": t.what, "seconds": round(t.seconds, 1),
                               "facts": t.facts} for t in trials]}
    path.write_text(json.dumps(runs, indent=2) + "\n")
