"""`mtkd-score`: rank aggregation operators on held-out cached positions and write the choice.

Thin: reads the cache through :func:`mtkd_train.scoring.score_cache`, prints a table, writes the
chosen `aggregate` / `aggregate_kwargs` (plus `cache` and `teachers`) as a YAML config that
`mtkd-train --config` reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import yaml

from mtkd_cache.cli import _storage_options
from mtkd_train.scoring._choose import score_cache


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("cache")
@click.option("--teachers", required=True, help="Comma-separated teacher names of CACHE.")
@click.option("--max-positions", type=int, default=20_000, show_default=True, help="Held-out positions to read.")
@click.option("--operators", default=None, help="Comma-separated operators to consider (default: all).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the chosen configuration here (YAML for `mtkd-train --config`).")
@click.option("--domains/--no-domains", default=True, show_default=True,
              help="Also fit per-domain mixture weights by EM (a `routing` candidate) when CACHE has domains.")
@click.option("--storage-options", envvar="MTKD_STORAGE_OPTIONS", callback=_storage_options, default=None,
              help="fsspec options for a remote CACHE, as JSON; also read from $MTKD_STORAGE_OPTIONS (or given to "
                   "`mtkd-cache --storage-options ... score`).")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked rows as JSON.")
def main(cache: str, teachers: str, max_positions: int, operators: str | None, out: Path | None, domains: bool,
         storage_options: dict[str, Any], as_json: bool) -> None:
    """Score every aggregation operator over TEACHERS on CACHE's held-out positions, best first.

    Each row is the aggregate's NLL of the true token (perplexity for LMs), its ECE and top-1
    accuracy; mixture weights come from EM (globally and, with domains, per domain), tau from a 1-D
    search. `label_aware` is scored but never chosen (it sees the label it is scored on). Also run
    as `mtkd-cache score`.
    """
    from mtkd_cache.errors import CacheIncompleteError, CacheMismatchError, CacheNotFoundError
    from mtkd_train.aggregate import AGGREGATORS

    opts = storage_options or dict(click.get_current_context().find_root().obj or {})  # or `mtkd-cache`'s
    names = [t for t in teachers.split(",") if t]
    candidates = operators.split(",") if operators else None
    if not domains:  # per-domain weights are the routing candidate
        candidates = [o for o in (candidates or AGGREGATORS) if o != "routing"]
    info: dict[str, object] = {}
    try:
        rows, chosen = score_cache(cache, names, max_positions=max_positions, operators=candidates,
                                   storage_options=opts or None, heldout_info=info)
    except (CacheIncompleteError, CacheMismatchError, CacheNotFoundError, ValueError, LookupError) as e:
        raise click.ClickException(f"{type(e).__name__}: {e}") from e
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in rows], indent=2))
    else:
        click.echo(f"{'operator':<12} {'nll':>8} {'ppl':>10} {'ece':>7} {'acc':>7}  {'':<28} options")
        for r in rows:
            d = r.to_dict()
            mark = "" if r.auto else "  (not auto: uses the label / needs training)"
            click.echo(f"{r.aggregate:<12} {r.nll:8.4f} {d['perplexity']:10.3f} {r.ece:7.4f} {r.accuracy:7.4f}  "
                       f"{r.note:<28} {json.dumps(dict(r.kwargs))}{mark}")
        click.echo(f"chosen: {json.dumps(chosen)}")
        click.echo(f"scored {info['positions']} positions, {100 * float(info['aligned']):.1f}% of those read "  # type: ignore[arg-type]
                   "(cross-tokenizer teachers are scored where they are aligned)")
    if out is not None:
        out.write_text(yaml.safe_dump({"cache": cache, "teachers": names, **chosen}, sort_keys=False))
        click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
