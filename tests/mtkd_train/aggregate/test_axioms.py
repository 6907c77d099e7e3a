"""The five aggregation axioms (docs/AGGREGATION.md, after arXiv 2601.09165), for every operator.

Each axiom is a hypothesis property test parametrised over the operators that satisfy it, and
every (operator, axiom) pair that is broken by design has a concrete counterexample test that
asserts the violation. ``test_status_table_covers_every_operator_and_axiom`` keeps the table, the
registry and the counterexamples in step, so a new operator cannot skip an axiom silently.

Distributions are compared densely (``to_dense``) on tiny vocabularies; "teacher" always means
the full distribution a sparse target stands for under the spread reading, unless a test says
bucket.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkd_train.aggregate import AGGREGATORS, AggregationContext, Aggregator, build_aggregator
from mtkd_train.targets import SparseTargets, from_dense, renormalize, retemper, to_dense

PROPERTY = settings(max_examples=30, deadline=None, database=None, derandomize=True)
AXIOMS = ("convexity", "positivity", "continuity", "monotonicity", "temperature")
Boost = tuple[int, float] | None  # (teacher, factor): raise that teacher's weight by the factor


# ----------------------------------------------------------------------------- operators


def _base(n: int, boost: Boost) -> list[float]:
    w = [1.0 + j for j in range(n)]  # deliberately non-uniform
    if boost is not None:
        w[boost[0]] *= boost[1]
    return w


@dataclass(frozen=True)
class Case:
    """An operator configuration plus its weight knob (how to raise teacher i's weight)."""

    name: str
    registry: str
    make: Callable[[int, int, Boost], Aggregator]
    gate_boost: bool = False
    bucket: bool = True  # honours tail_mode="bucket" (loglinear always pools under "spread")


def _routing_hard(n: int, v: int, boost: Boost) -> Aggregator:
    route = {0: 0, 1: n - 1} if boost is None else {0: boost[0], 1: boost[0]}
    return build_aggregator("routing", num_teachers=n, domain_to_teacher=route)


def _routing_mix(n: int, v: int, boost: Boost) -> Aggregator:
    base = _base(n, boost)
    other = _base(n, None)[::-1]
    if boost is not None:
        other[boost[0]] *= boost[1]
    return build_aggregator("routing", num_teachers=n, domain_weights={0: base, 1: other})


CASES = {
    c.name: c
    for c in [
        Case(
            "mean",
            "mean",
            lambda n, v, b: build_aggregator("mean", num_teachers=n, weights=_base(n, b)),
        ),
        Case(
            "loglinear",
            "loglinear",
            lambda n, v, b: build_aggregator("loglinear", num_teachers=n, weights=_base(n, b)),
            bucket=False,
        ),
        Case(
            "entropy",
            "entropy",
            lambda n, v, b: build_aggregator(
                "entropy", num_teachers=n, tau=0.5, base_weights=_base(n, b), vocab_size=v
            ),
        ),
        Case(
            "confidence",
            "confidence",
            lambda n, v, b: build_aggregator(
                "confidence", num_teachers=n, tau=0.2, base_weights=_base(n, b)
            ),
        ),
        Case(
            "label_aware",
            "label_aware",
            lambda n, v, b: build_aggregator(
                "label_aware", num_teachers=n, base_weights=_base(n, b), vocab_size=v
            ),
        ),
        Case(
            "gate",
            "gate",
            lambda n, v, b: build_aggregator("gate", num_teachers=n),
            gate_boost=True,
        ),
        Case("routing_hard", "routing", _routing_hard),
        Case("routing_mix", "routing", _routing_mix),
        Case(
            "mtbkd",
            "mtbkd",
            lambda n, v, b: build_aggregator(
                "mtbkd", num_teachers=n, prior_strength=0.2, base_weights=_base(n, b), vocab_size=v
            ),
        ),
    ]
}

# "holds", or why the axiom is broken by design (each has a counterexample test below).
STATUS: dict[str, dict[str, str]] = {name: dict.fromkeys(AXIOMS, "holds") for name in CASES}
STATUS["loglinear"]["convexity"] = "geometric pooling can exceed every teacher on a token"
STATUS["mtbkd"]["convexity"] = "smoothing toward uniform leaves the teachers' hull"
STATUS["loglinear"]["continuity"] = "the product is undefined where supports are disjoint"
STATUS["label_aware"]["continuity"] = "a label probability of 0 (vs. eps) flips to the fallback"
STATUS["mtbkd"]["monotonicity"] = "the uniform component can be closer to p_i than p_i's own mix"
for _name in ("mean", "entropy", "confidence", "label_aware", "gate", "routing_mix", "mtbkd"):
    STATUS[_name]["temperature"] = "a mixture of tempered teachers is not the tempered mixture"


def _holding(axiom: str) -> list[str]:
    return [name for name, row in STATUS.items() if row[axiom] == "holds"]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class World:
    """Random teachers plus a matching context, all from one seed."""

    targets: list[SparseTargets]
    vocab: int
    seed: int

    @property
    def n(self) -> int:
        return len(self.targets)

    @property
    def p(self) -> int:
        return self.targets[0].logp.shape[0]

    def ctx(self, boost: Boost = None) -> AggregationContext:
        g = torch.Generator().manual_seed(self.seed + 1)
        labels = torch.randint(0, self.vocab, (self.p,), generator=g)
        labels = torch.where(torch.rand(self.p, generator=g) < 0.25, -100, labels)
        gate = torch.randn(self.p, self.n, generator=g)
        if boost is not None:
            gate[:, boost[0]] += math.log(boost[1])
        domains = torch.randint(0, 2, (self.p,), generator=g)
        return AggregationContext(labels=labels, domains=domains, gate_logits=gate)


def _teacher(g: torch.Generator, p: int, v: int, k: int, zero_tail: bool) -> SparseTargets:
    logits = torch.randn(p, v, generator=g) * 1.5
    if zero_tail:  # support of exactly k tokens; from_dense(.., k_pad) adds padding entries
        support = torch.rand(p, v, generator=g).argsort(dim=1)[:, :k]
        mask = torch.zeros(p, v, dtype=torch.bool).scatter(1, support, True)
        probs = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=1)
        k_pad = int(torch.randint(k, v + 1, (1,), generator=g))
        return from_dense(probs, k_pad)
    return from_dense(torch.softmax(logits, dim=1), k)


@st.composite
def worlds(draw: st.DrawFn, zero_tails: bool = False) -> World:
    v = draw(st.integers(3, 8))
    n = draw(st.integers(2, 3))
    p = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**30))
    g = torch.Generator().manual_seed(seed)
    targets = [
        _teacher(g, p, v, draw(st.integers(1, v)), zero_tails and draw(st.booleans()))
        for _ in range(n)
    ]
    return World(targets, v, seed)


def _run(
    agg: Aggregator,
    targets: list[SparseTargets],
    ctx: AggregationContext,
    v: int,
    mode: str = "spread",
) -> torch.Tensor:
    return to_dense(agg(targets, ctx, vocab_size=v, tail_mode=mode), v, mode).double()


def _dense(targets: list[SparseTargets], v: int, mode: str = "spread") -> torch.Tensor:
    return torch.stack([to_dense(t, v, mode).double() for t in targets], dim=1)  # (P, N, V)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum(-1)


# ----------------------------------------------------------------------------- axiom 1


@pytest.mark.parametrize("name", _holding("convexity"))
@PROPERTY
@given(world=worlds())
def test_convexity_unanimity_and_hull(name: str, world: World) -> None:
    agg, v, ctx = CASES[name].make(world.n, world.vocab, None), world.vocab, world.ctx()
    # (a) identical teachers (columns shuffled per copy) aggregate to that teacher, both modes
    t0 = world.targets[0]
    copies = [
        SparseTargets(t0.indices.roll(i, 1), t0.logp.roll(i, 1), t0.tail) for i in range(world.n)
    ]
    for mode in ("spread", "bucket"):
        torch.testing.assert_close(
            _run(agg, copies, ctx, v, mode), to_dense(t0, v, mode).double(), atol=1e-5, rtol=0
        )
    # (b) the aggregate is the mixture with agg.weights, and lies tokenwise in [min_i, max_i]
    teachers, out = _dense(world.targets, v), _run(agg, world.targets, ctx, v)
    w = agg.weights(world.targets, ctx)
    assert w is not None and bool((w >= 0).all())
    torch.testing.assert_close(w.sum(1), torch.ones(world.p))
    torch.testing.assert_close(
        out, torch.einsum("pn,pnv->pv", w.double(), teachers), atol=1e-5, rtol=0
    )
    assert bool(
        (out >= teachers.min(1).values - 1e-6).all() & (out <= teachers.max(1).values + 1e-6).all()
    )


def _full(rows: list[list[float]]) -> SparseTargets:
    """Targets keeping the whole vocabulary (no tail)."""
    p = torch.tensor(rows, dtype=torch.float32)
    idx = torch.arange(p.shape[1]).expand_as(p).contiguous()
    return SparseTargets(
        idx, torch.where(p > 0, p.clamp(min=1e-30).log(), -math.inf), torch.zeros(p.shape[0])
    )


def counter_loglinear_convexity() -> None:
    t1, t2 = _full([[0.9, 0.05, 0.05]]), _full([[0.05, 0.9, 0.05]])
    out = _run(build_aggregator("loglinear", num_teachers=2), [t1, t2], AggregationContext(), 3)
    assert out[0, 2] > 0.1  # both teachers say .05; the normalised geometric mean says ~.105
    hot = build_aggregator("loglinear", num_teachers=2, temperature=2.0)
    same = _run(hot, [t1, t1], AggregationContext(), 3)
    assert (same - to_dense(t1, 3).double()).abs().max() > 0.1  # T != 1 also breaks unanimity


def counter_mtbkd_convexity() -> None:
    t = from_dense(torch.tensor([[0.7, 0.3, 0.0, 0.0]]), 2)  # tokens 2, 3 impossible
    agg = build_aggregator("mtbkd", num_teachers=2, prior_strength=0.2, vocab_size=4)
    out = _run(agg, [t, t], AggregationContext(), 4)
    assert out[0, 2] == pytest.approx(0.2 / 4)  # above max_i p_i(2) = 0: outside the hull


# ----------------------------------------------------------------------------- axiom 2


@pytest.mark.parametrize("name", _holding("positivity"))
@PROPERTY
@given(world=worlds(zero_tails=True))
def test_positivity_inheritance(name: str, world: World) -> None:
    agg, v, ctx = CASES[name].make(world.n, world.vocab, None), world.vocab, world.ctx()
    w = agg.weights(world.targets, ctx)  # None for loglinear
    if w is not None:
        assert bool((w >= 0).all())
    for mode in ("spread", "bucket") if CASES[name].bucket else ("spread",):
        teachers, out = _dense(world.targets, v, mode), _run(agg, world.targets, ctx, v, mode)
        everyone = (teachers > 0).all(dim=1)  # (P, V[+1]) positive under every teacher
        assert bool((out[everyone] > 0).all())
        assert bool((out >= 0).all())


# ----------------------------------------------------------------------------- axiom 3


def _perturb(t: SparseTargets, g: torch.Generator, eps: float) -> SparseTargets:
    noise = torch.randn(t.logp.shape, generator=g) * eps
    tail = t.tail * torch.exp(torch.randn(t.tail.shape, generator=g) * eps)
    return renormalize(SparseTargets(t.indices, t.logp + noise, tail))


@pytest.mark.parametrize("name", list(CASES))
@PROPERTY
@given(world=worlds())
def test_continuity_on_the_interior(name: str, world: World) -> None:
    """Every operator is Lipschitz-continuous where all teachers have positive tails."""
    agg, v, ctx = CASES[name].make(world.n, world.vocab, None), world.vocab, world.ctx()
    g = torch.Generator().manual_seed(world.seed + 2)
    eps = 1e-4
    moved = [_perturb(t, g, eps) for t in world.targets]
    step = (_dense(moved, v) - _dense(world.targets, v)).abs().sum(-1).max() / 2  # input TV
    change = (_run(agg, moved, ctx, v) - _run(agg, world.targets, ctx, v)).abs().sum(-1).max() / 2
    assert change <= 50 * step + 1e-6


def counter_loglinear_continuity() -> None:
    t2 = _full([[0.0, 1.0]])
    agg = build_aggregator("loglinear", num_teachers=2)
    at_boundary = _run(agg, [_full([[1.0, 0.0]]), t2], AggregationContext(), 2)
    for eps in (1e-2, 1e-4, 1e-6):
        near = _run(agg, [_full([[1.0 - eps, eps]]), t2], AggregationContext(), 2)
        assert (near - at_boundary).abs().sum() / 2 > 0.49  # jump of 1/2 however small eps is


def counter_label_aware_continuity() -> None:
    agg = build_aggregator("label_aware", num_teachers=2, vocab_size=2)
    ctx = AggregationContext(labels=torch.tensor([1]))
    w0 = agg.weights([_full([[1.0, 0.0]]), _full([[1.0, 0.0]])], ctx)
    for eps in (1e-3, 1e-6):
        w = agg.weights([_full([[1.0 - eps, eps]]), _full([[1.0, 0.0]])], ctx)
        assert (w - w0).abs().max() > 0.49  # eps > 0: all weight on teacher 0; eps = 0: uniform


# ----------------------------------------------------------------------------- axiom 4


@pytest.mark.parametrize("name", _holding("monotonicity"))
@PROPERTY
@given(world=worlds(), teacher=st.integers(0, 2), factor=st.floats(1.5, 20.0))
def test_weight_monotonicity(name: str, world: World, teacher: int, factor: float) -> None:
    case, v = CASES[name], world.vocab
    i = teacher % world.n
    boost = (i, factor)
    agg0, agg1 = case.make(world.n, v, None), case.make(world.n, v, boost)
    ctx0, ctx1 = world.ctx(), world.ctx(boost if case.gate_boost else None)
    w0, w1 = agg0.weights(world.targets, ctx0), agg1.weights(world.targets, ctx1)
    if w0 is not None and w1 is not None:  # the knob really raised teacher i's weight
        assert bool(((w1[:, i] > w0[:, i]) | (w0[:, i] > 1 - 1e-6)).all())
    p_i = _dense(world.targets, v)[:, i]
    before, after = _run(agg0, world.targets, ctx0, v), _run(agg1, world.targets, ctx1, v)
    assert bool((_kl(p_i, after) <= _kl(p_i, before) + 1e-5).all())


def counter_mtbkd_monotonicity() -> None:
    p1, p2 = _full([[0.9, 0.1]]), _full([[1.0, 0.0]])
    kls = []
    for base in ([0.01, 0.99], [0.99, 0.01]):  # raise teacher 0's weight
        agg = build_aggregator(
            "mtbkd", num_teachers=2, tau=1e6, prior_strength=0.5, base_weights=base, vocab_size=2
        )
        kls.append(
            float(_kl(to_dense(p1, 2).double(), _run(agg, [p1, p2], AggregationContext(), 2))[0])
        )
    assert kls[1] > kls[0] + 0.03  # ~0.073 -> ~0.116: moved *away* from teacher 0


def test_loglinear_monotonicity_needs_temperature_one() -> None:
    p1, p2 = _full([[0.7, 0.3]]), _full([[0.3, 0.7]])
    kls = []
    for w in ([0.5, 0.5], [1.0, 0.0]):
        agg = build_aggregator("loglinear", num_teachers=2, weights=w, temperature=0.25)
        kls.append(
            float(_kl(to_dense(p1, 2).double(), _run(agg, [p1, p2], AggregationContext(), 2))[0])
        )
    assert kls[1] > kls[0] + 0.3  # ~0.08 -> ~0.44 at T = 0.25


# ----------------------------------------------------------------------------- axiom 5


@pytest.mark.parametrize("name", list(CASES))
@PROPERTY
@given(world=worlds())
def test_temperature_identity_and_high_temperature_limit(name: str, world: World) -> None:
    agg, v, ctx = CASES[name].make(world.n, world.vocab, None), world.vocab, world.ctx()
    plain = _run(agg, world.targets, ctx, v)
    torch.testing.assert_close(
        _run(agg, [retemper(t, 1.0, v) for t in world.targets], ctx, v), plain
    )
    hot = _run(agg, [retemper(t, 1e5, v) for t in world.targets], ctx, v)
    assert float((hot - 1.0 / v).abs().max()) < 1e-3


@pytest.mark.parametrize("name", _holding("temperature"))
@PROPERTY
@given(world=worlds(), temperature=st.floats(0.3, 5.0))
def test_temperature_commutes_with_aggregation(name: str, world: World, temperature: float) -> None:
    agg, v, ctx = CASES[name].make(world.n, world.vocab, None), world.vocab, world.ctx()
    merged = agg(world.targets, ctx, vocab_size=v, tail_mode="spread")
    tempered_after = to_dense(retemper(merged, temperature, v), v).double()
    tempered_before = _run(agg, [retemper(t, temperature, v) for t in world.targets], ctx, v)
    torch.testing.assert_close(tempered_before, tempered_after, atol=1e-5, rtol=1e-4)


@PROPERTY
@given(world=worlds(), temperature=st.floats(0.3, 5.0))
def test_loglinear_temperature_is_retempering_the_pool(world: World, temperature: float) -> None:
    v, w = world.vocab, _base(world.n, None)
    cold = build_aggregator("loglinear", num_teachers=world.n, weights=w)
    hot = build_aggregator("loglinear", num_teachers=world.n, weights=w, temperature=temperature)
    merged = cold(world.targets, AggregationContext(), vocab_size=v, tail_mode="spread")
    expected = to_dense(retemper(merged, temperature, v), v).double()
    torch.testing.assert_close(
        _run(hot, world.targets, AggregationContext(), v), expected, atol=1e-5, rtol=1e-4
    )


def _counter_temperature(name: str) -> Callable[[], None]:
    def check() -> None:
        t1, t2 = _full([[0.9, 0.1], [0.6, 0.4]]), _full([[0.2, 0.8], [0.1, 0.9]])
        world = World([t1, t2], 2, seed=0)
        ctx = AggregationContext(
            labels=torch.tensor([0, 1]), domains=torch.tensor([0, 1]), gate_logits=torch.zeros(2, 2)
        )
        agg = CASES[name].make(2, 2, None)
        after = to_dense(
            retemper(agg(world.targets, ctx, vocab_size=2, tail_mode="spread"), 0.5, 2), 2
        )
        before = _run(agg, [retemper(t, 0.5, 2) for t in world.targets], ctx, 2)
        assert float((before - after.double()).abs().max()) > 1e-2

    return check


# ----------------------------------------------------------------------------- bookkeeping

COUNTEREXAMPLES: dict[tuple[str, str], Callable[[], None]] = {
    ("loglinear", "convexity"): counter_loglinear_convexity,
    ("mtbkd", "convexity"): counter_mtbkd_convexity,
    ("loglinear", "continuity"): counter_loglinear_continuity,
    ("label_aware", "continuity"): counter_label_aware_continuity,
    ("mtbkd", "monotonicity"): counter_mtbkd_monotonicity,
    **{
        (n, "temperature"): _counter_temperature(n)
        for n in CASES
        if STATUS[n]["temperature"] != "holds"
    },
}


@pytest.mark.parametrize(("name", "axiom"), sorted(COUNTEREXAMPLES))
def test_broken_by_design_counterexample(name: str, axiom: str) -> None:
    """The operator violates the axiom on a concrete input (see STATUS for why)."""
    COUNTEREXAMPLES[(name, axiom)]()


def test_status_table_covers_every_operator_and_axiom() -> None:
    assert {c.registry for c in CASES.values()} == set(AGGREGATORS)
    broken = {(n, a) for n, row in STATUS.items() for a, s in row.items() if s != "holds"}
    assert broken == set(COUNTEREXAMPLES)
