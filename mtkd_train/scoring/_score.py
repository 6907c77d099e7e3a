"""Score aggregation operators on held-out positions, before any student is trained.

The quality of a KD target can be measured without a student: the aggregated distribution's
negative log-likelihood of the true next token (a proper scoring rule) and its calibration (ECE
of its top-1). Every cached teacher's targets on held-out positions are already stored, so
scoring all operators is cheap: ``O(P N K log(N K))`` per candidate (the union of supports).

Tail handling: scoring reads the tail as ``"spread"``, so the aggregate is a full distribution
over V tokens and its NLL is a likelihood. ``label_aware`` weights teachers by the very label it
is scored on, so its held-out NLL is optimistic; it is scored but never chosen automatically
(nor is ``gate``, which needs a trained network). Pure tensor code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mtkd_train.aggregate import AggregationContext, label_log_prob
from mtkd_train.aggregate._base import OperatorSetup
from mtkd_train.aggregate._registry import AGGREGATORS, make_aggregator
from mtkd_train.scoring._em import fit_mixture_em
from mtkd_train.targets import SparseTargets
from mtkd_train.uncertainty import expected_calibration_error

__all__ = ["HeldOut", "ScoreRow", "golden_section", "rank_operators", "score_operator", "teacher_label_logp"]

#: operators whose held-out score is biased (uses the label) or needs training; never auto-chosen
NOT_AUTO = frozenset({"label_aware", "gate"})
#: operators with a ``tau`` searched in 1-D
SCORED = ("entropy", "confidence", "mtbkd")


@dataclass(frozen=True)
class HeldOut:
    """Held-out positions of N teachers.

    Attributes:
        targets: One :class:`SparseTargets` ``(P, K_i)`` per teacher, at temperature 1.
        labels: ``(P,)`` int64 true next token (or class).
        vocab_size: ``V``.
        domains: ``(P,)`` int64 domain codes, or ``None``.
        domain_names: Name of each domain code.
        teachers: Teacher names, in the order of ``targets``.
        aligned: Share of the held-out positions read that are scored: below 1 when a teacher on
            its own tokenization is not aligned with every student position (docs/CROSS_TOKENIZER.md).
    """

    targets: tuple[SparseTargets, ...]
    labels: torch.Tensor
    vocab_size: int
    domains: torch.Tensor | None = None
    domain_names: tuple[str, ...] = ()
    teachers: tuple[str, ...] = ()
    aligned: float = 1.0

    def __post_init__(self) -> None:
        p = self.labels.shape[0]
        if any(t.logp.shape[0] != p for t in self.targets):
            raise ValueError(f"every teacher needs {p} rows, got {[t.logp.shape[0] for t in self.targets]}")
        if self.domains is not None and self.domains.shape != (p,):
            raise ValueError(f"domains must be ({p},), got {tuple(self.domains.shape)}")

    @property
    def num_positions(self) -> int:
        return int(self.labels.shape[0])

    def block(self, a: int, b: int) -> HeldOut:
        """Rows ``[a, b)``."""
        return HeldOut(tuple(SparseTargets(t.indices[a:b], t.logp[a:b], t.tail[a:b]) for t in self.targets),
                       self.labels[a:b], self.vocab_size,
                       None if self.domains is None else self.domains[a:b], self.domain_names, self.teachers,
                       self.aligned)


@dataclass(frozen=True)
class ScoreRow:
    """One candidate's held-out score."""

    aggregate: str
    kwargs: Mapping[str, Any]
    nll: float
    ece: float
    accuracy: float
    mean_weights: tuple[float, ...] | None = None
    auto: bool = True
    note: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        return {"aggregate": self.aggregate, "aggregate_kwargs": dict(self.kwargs), "nll": self.nll,
                "perplexity": math.exp(self.nll) if self.nll < 700 else math.inf, "ece": self.ece,
                "accuracy": self.accuracy, "mean_weights": self.mean_weights, "auto": self.auto,
                "note": self.note}


def teacher_label_logp(data: HeldOut) -> torch.Tensor:
    """``(P, N)`` each teacher's log-probability of the true token (tail spread over unkept tokens)."""
    return torch.stack([label_log_prob(t, data.labels, data.vocab_size) for t in data.targets], dim=1)


def _build(data: HeldOut, name: str, kwargs: Mapping[str, Any]) -> Any:
    n = len(data.targets)
    setup = OperatorSetup(data.teachers or tuple(str(i) for i in range(n)), data.vocab_size, data.domain_names)
    return make_aggregator(name, setup, kwargs)


def score_operator(data: HeldOut, name: str, kwargs: Mapping[str, Any], *, block: int = 4096, note: str = ""
                   ) -> ScoreRow:
    """NLL, ECE and top-1 accuracy of one operator's aggregate on the held-out positions.

    Args:
        data: The held-out positions.
        name: An operator of the registry.
        kwargs: Its options (``vocab_size`` is filled in).
        block: Positions per step (bounds the union's memory).

    Returns:
        The :class:`ScoreRow`.
    """
    agg = _build(data, name, kwargs)
    nll, confs, oks, wsum = 0.0, [], [], None
    for a in range(0, data.num_positions, block):
        d = data.block(a, min(a + block, data.num_positions))
        ctx = AggregationContext(labels=d.labels, domains=d.domains)
        merged = agg(list(d.targets), ctx, vocab_size=d.vocab_size, tail_mode="spread")
        lp = label_log_prob(merged, d.labels, d.vocab_size)  # (p,)
        nll -= float(lp.clamp_min(-1e4).sum())
        best = merged.logp.argmax(dim=-1, keepdim=True)  # (p, 1)
        confs.append(merged.logp.gather(-1, best).squeeze(-1).exp())
        oks.append(merged.indices.gather(-1, best).squeeze(-1) == d.labels)
        w = agg.weights(list(d.targets), ctx)
        if w is not None:
            wsum = w.sum(0) if wsum is None else wsum + w.sum(0)
    p = max(data.num_positions, 1)
    conf, ok = torch.cat(confs), torch.cat(oks)
    return ScoreRow(name, dict(kwargs), nll / p, expected_calibration_error(confidences=conf.clamp(0, 1), correct=ok),
                    float(ok.float().mean()) if len(ok) else 0.0,
                    None if wsum is None else tuple(round(float(x) / p, 4) for x in wsum),
                    auto=name not in NOT_AUTO, note=note)


def golden_section(f: Callable[[float], float], lo: float, hi: float, *, iters: int = 12) -> tuple[float, float]:
    """Minimise a unimodal ``f`` on ``[lo, hi]``; returns ``(argmin, min)``. ``iters + 2`` calls."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (c, fc) if fc <= fd else (d, fd)


def _fit_tau(data: HeldOut, name: str, base: Mapping[str, Any], note: str) -> ScoreRow:
    """The operator at the ``tau`` (searched on log10 tau in [-2, 2]) minimising held-out NLL."""
    cache: dict[float, ScoreRow] = {}

    def nll(log_tau: float) -> float:
        row = score_operator(data, name, {**base, "tau": round(10 ** log_tau, 4)}, note=note)
        cache[log_tau] = row
        return row.nll

    best, _ = golden_section(nll, -2.0, 2.0)
    return cache[best]


def rank_operators(data: HeldOut, *, operators: Sequence[str] | None = None, em_iters: int = 500
                   ) -> list[ScoreRow]:
    """Score every operator (with fitted weights and tau) and rank by held-out NLL.

    Candidates: each teacher alone (``mean`` with one-hot weights), ``mean`` uniform and with EM weights; ``routing`` with per-domain EM weights (if
    the data has domains); ``loglinear``; ``entropy``/``confidence``/``mtbkd`` with tau fitted,
    uniform and EM base weights; ``label_aware`` (scored, never chosen: it sees the label).

    Args:
        data: Held-out positions.
        operators: Restrict to these names (default: all that apply).
        em_iters: EM iteration cap.

    Returns:
        Rows sorted by NLL (best first).
    """
    names = set(operators or AGGREGATORS) - {"gate"}
    lp = teacher_label_logp(data)
    em = fit_mixture_em(lp, max_iter=em_iters)
    w_em = [round(float(x), 6) for x in em.weights[0]]
    n = len(data.targets)
    label = data.teachers or tuple(f"teacher {i}" for i in range(n))
    rows = [score_operator(data, "mean", {"weights": [float(j == i) for j in range(n)]}, note=f"{label[i]} alone")
            for i in range(n)]
    if "mean" in names:
        rows += [score_operator(data, "mean", {}, note="uniform"),
                 score_operator(data, "mean", {"weights": w_em}, note="EM weights")]
    if "routing" in names and data.domains is not None:
        g = fit_mixture_em(lp, data.domains, max(len(data.domain_names), int(data.domains.max()) + 1),
                           max_iter=em_iters)
        table = {i: [round(float(x), 6) for x in g.weights[i]] for i in range(g.weights.shape[0])}
        rows.append(score_operator(data, "routing", {"domain_weights": table}, note="per-domain EM weights"))
    if "loglinear" in names:
        rows.append(score_operator(data, "loglinear", {}))
    for name in SCORED:
        if name in names:
            rows += [_fit_tau(data, name, {}, "tau fitted"),
                     _fit_tau(data, name, {"base_weights": w_em}, "tau fitted, EM base weights")]
    if "label_aware" in names:
        rows.append(score_operator(data, "label_aware", {}))
    return sorted(rows, key=lambda r: r.nll)
