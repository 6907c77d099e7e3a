"""Task routing: a per-position domain code chooses a teacher or a teacher mixture.

A lookup table ``(D, N)`` is built once from the mapping; each batch does a ``searchsorted`` of
its domain codes into the sorted keys, ``O(P log D)``. Users write domain and teacher *names*;
:meth:`RoutingAggregator.resolve_options` turns them into codes and refuses a domain of the cache
that has no route (it would otherwise fail at the first batch holding it, mid-run).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from mtkd_train.aggregate._base import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    Aggregator,
    OperatorSetup,
    parse_weight_vector,
)
from mtkd_train.aggregate._linear import parse_num_teachers
from mtkd_train.targets import SparseTargets

__all__ = ["RoutingAggregator"]


def _code(key: Any, names: Sequence[str] | None, what: str) -> Any:
    """A name's index in ``names``; integers (and digit strings, as JSON keys are) pass as codes."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.lstrip("-").isdigit():
        return int(key)
    if isinstance(key, str) and names is not None and key in names:
        return list(names).index(key)
    raise AggregationConfigError(f"routing: {what} {key!r} is not known; the {what}s are {list(names or ())}")


def _table(
    num_teachers: int,
    domain_to_teacher: Mapping[int, int] | None,
    domain_weights: Mapping[int, Sequence[float]] | None,
) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """Validate the mapping and return ``((domain, weights), ...)`` sorted by domain."""
    if (domain_to_teacher is None) == (domain_weights is None):
        raise AggregationConfigError(
            "routing needs exactly one of domain_to_teacher (domain -> teacher index) or "
            "domain_weights (domain -> one weight per teacher)"
        )
    rows: dict[int, tuple[float, ...]] = {}
    if domain_to_teacher is not None:
        for domain, teacher in domain_to_teacher.items():
            if not isinstance(teacher, int) or not 0 <= teacher < num_teachers:
                raise AggregationConfigError(
                    f"domain_to_teacher[{domain!r}]={teacher!r} must be a teacher index in "
                    f"[0, {num_teachers})"
                )
            rows[int(domain)] = tuple(float(i == teacher) for i in range(num_teachers))
    elif domain_weights is not None:
        for domain, weights in domain_weights.items():
            rows[int(domain)] = parse_weight_vector(
                f"domain_weights[{domain!r}]", weights, num_teachers
            )
    if not rows:
        raise AggregationConfigError("routing mapping is empty; give at least one domain")
    return tuple(sorted(rows.items()))


@dataclass(frozen=True)
class RoutingAggregator(Aggregator):
    """``routing``: ``w(pos) = table[ctx.domains[pos]]``; one-hot or a per-domain mixture.

    Attributes:
        num_teachers: ``N``.
        routes: ``((domain, normalised weights), ...)`` sorted by domain, built from the
            constructor's ``domain_to_teacher`` or ``domain_weights``.
    """

    num_teachers: int
    routes: tuple[tuple[int, tuple[float, ...]], ...] = field(default=())
    context: ClassVar[frozenset[str]] = frozenset({"domains"})

    @classmethod
    def resolve_options(cls, options: Mapping[str, Any], setup: OperatorSetup) -> dict[str, Any]:
        """Domain and teacher names -> codes; every domain of the cache must have a route.

        Raises:
            AggregationConfigError: an unknown domain or teacher name, a cache without domains,
                or a domain of the cache with no route.
        """
        out = dict(options)
        domains = setup.domains
        if domains is not None and not domains:
            raise AggregationConfigError("routing needs a cache with domains, and this one has none; prepare it "
                                         "with a domain column (mtkd-cache prepare --domain-column)")
        if "domain_to_teacher" in out:
            out["domain_to_teacher"] = {_code(k, domains, "domain"): _code(v, setup.teachers, "teacher")
                                        for k, v in dict(out["domain_to_teacher"]).items()}
        if "domain_weights" in out:
            out["domain_weights"] = {_code(k, domains, "domain"): list(v)
                                     for k, v in dict(out["domain_weights"]).items()}
        routed = set(out.get("domain_to_teacher") or {}) | set(out.get("domain_weights") or {})
        missing = [d for i, d in enumerate(domains or ()) if i not in routed]
        if missing:
            raise AggregationConfigError(f"routing: the cache's domains {missing} have no route; add them to "
                                         f"domain_to_teacher or domain_weights (the cache's domains are {list(domains or ())})")
        return out

    def __init__(
        self,
        num_teachers: int,
        domain_to_teacher: Mapping[int, int] | None = None,
        domain_weights: Mapping[int, Sequence[float]] | None = None,
    ) -> None:
        n = parse_num_teachers(num_teachers)
        object.__setattr__(self, "num_teachers", n)
        object.__setattr__(self, "routes", _table(n, domain_to_teacher, domain_weights))

    def _weights(
        self, targets: Sequence[SparseTargets], ctx: AggregationContext, vocab_size: int | None
    ) -> torch.Tensor:
        domains = ctx.domains
        p = targets[0].logp.shape[0]
        if domains is None or tuple(domains.shape) != (p,):
            got = None if domains is None else tuple(domains.shape)
            raise AggregationInputError(
                f"'routing' needs ctx.domains of shape ({p},), got {got}; pass the domain code "
                "of every position in AggregationContext"
            )
        device = domains.device
        keys = torch.tensor([d for d, _ in self.routes], dtype=torch.int64, device=device)
        table = torch.tensor([w for _, w in self.routes], dtype=torch.float32, device=device)
        pos = torch.searchsorted(keys, domains.to(torch.int64)).clamp(max=len(self.routes) - 1)
        known = keys[pos] == domains
        if not bool(known.all()):
            unknown = sorted({int(d) for d in domains[~known].unique()})
            raise AggregationInputError(
                f"domain(s) {unknown} have no route; known domains are {keys.tolist()}. Add "
                "them to domain_to_teacher / domain_weights"
            )
        return table[pos]  # (P, N)
