"""`routing` at the edges a mutation run found unchecked (docs/TESTING.md): names and codes in
`resolve_options`, teacher-index bounds, the sorted table, domains above and below every routed
one, and the exact errors.
"""

from __future__ import annotations

import pytest
import torch

from mtkd_train.aggregate import (
    AggregationConfigError,
    AggregationContext,
    AggregationInputError,
    RoutingAggregator,
)
from mtkd_train.aggregate._base import OperatorSetup
from mtkd_train.targets import SparseTargets, from_dense

V = 5


def _teachers(n: int = 3, p: int = 4) -> list[SparseTargets]:
    g = torch.Generator().manual_seed(3)
    return [from_dense(torch.softmax(torch.randn(p, V, generator=g), -1), 2) for _ in range(n)]


def _resolve(options: dict, domains: tuple[str, ...] | None = ("web", "code", "math")) -> dict:
    return RoutingAggregator.resolve_options(options, OperatorSetup(("a", "b", "c"), V, domains))


def test_resolve_turns_names_and_digit_strings_into_codes() -> None:
    out = _resolve({"domain_to_teacher": {"math": "c", "web": "a", "1": 1}})
    assert out["domain_to_teacher"] == {2: 2, 0: 0, 1: 1}
    out = _resolve({"domain_weights": {"code": (1, 0, 1), 0: [1, 1, 1], "2": [0, 0, 1]}})
    assert out["domain_weights"] == {1: [1, 0, 1], 0: [1, 1, 1], 2: [0, 0, 1]}


def test_resolve_with_unknown_domain_names_takes_integer_codes_only() -> None:
    out = _resolve({"domain_to_teacher": {"-2": "b", 7: 0}}, domains=None)
    assert out["domain_to_teacher"] == {-2: 1, 7: 0}
    with pytest.raises(AggregationConfigError) as err:
        _resolve({"domain_to_teacher": {"web": 0}}, domains=None)
    assert str(err.value) == "routing: domain 'web' is not known; the domains are []"


@pytest.mark.parametrize("key", [True, 1.0, "x1", None])
def test_resolve_refuses_keys_that_are_neither_codes_nor_names(key: object) -> None:
    with pytest.raises(AggregationConfigError) as err:
        _resolve({"domain_to_teacher": {key: 0, "web": 0, "code": 0, "math": 0}})
    assert str(err.value) == f"routing: domain {key!r} is not known; the domains are ['web', 'code', 'math']"


def test_resolve_names_an_unknown_teacher_and_the_known_ones() -> None:
    with pytest.raises(AggregationConfigError) as err:
        _resolve({"domain_to_teacher": {"web": "z", "code": 0, "math": 0}})
    assert str(err.value) == "routing: teacher 'z' is not known; the teachers are ['a', 'b', 'c']"


def test_resolve_lists_every_domain_without_a_route() -> None:
    with pytest.raises(AggregationConfigError) as err:
        _resolve({"domain_weights": {"code": [1, 1, 1]}})
    assert str(err.value) == ("routing: the cache's domains ['web', 'math'] have no route; add them to "
                              "domain_to_teacher or domain_weights (the cache's domains are ['web', 'code', 'math'])")


def test_resolve_leaves_other_options_alone_and_does_not_change_its_input() -> None:
    options = {"domain_to_teacher": {"web": "b", "code": "b", "math": "a"}}
    out = _resolve(options)
    assert options == {"domain_to_teacher": {"web": "b", "code": "b", "math": "a"}}
    assert out == {"domain_to_teacher": {0: 1, 1: 1, 2: 0}}


def test_teacher_index_bounds_and_message() -> None:
    agg = RoutingAggregator(3, domain_to_teacher={0: 0, 1: 2})
    assert agg.routes == ((0, (1.0, 0.0, 0.0)), (1, (0.0, 0.0, 1.0)))
    for bad in (3, -1, "1", 1.0):
        with pytest.raises(AggregationConfigError) as err:
            RoutingAggregator(3, domain_to_teacher={4: bad})  # type: ignore[dict-item]
        assert str(err.value) == f"domain_to_teacher[4]={bad!r} must be a teacher index in [0, 3)"


def test_config_error_texts_are_exact() -> None:
    with pytest.raises(AggregationConfigError) as err:
        RoutingAggregator(2)
    assert str(err.value) == ("routing needs exactly one of domain_to_teacher (domain -> teacher index) or "
                              "domain_weights (domain -> one weight per teacher)")
    with pytest.raises(AggregationConfigError) as err:
        RoutingAggregator(2, domain_to_teacher={})
    assert str(err.value) == "routing mapping is empty; give at least one domain"
    with pytest.raises(AggregationConfigError, match="num_teachers must be a positive int, got 0"):
        RoutingAggregator(0, domain_to_teacher={0: 0})


def test_routes_are_sorted_by_domain_and_keyed_by_int() -> None:
    agg = RoutingAggregator(2, domain_weights={"9": [1, 0], -4: [0, 2], 3: [1, 3]})  # type: ignore[dict-item]
    assert agg.num_teachers == 2
    assert agg.routes == ((-4, (0.0, 1.0)), (3, (0.25, 0.75)), (9, (1.0, 0.0)))


def test_weights_for_domains_around_and_between_the_routed_ones() -> None:
    agg = RoutingAggregator(3, domain_to_teacher={10: 2, -5: 0, 3: 1})
    w = agg.weights(_teachers(p=5), AggregationContext(domains=torch.tensor([10, -5, 3, 10, -5], dtype=torch.int32)))
    assert w is not None and w.dtype == torch.float32
    assert w.tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]
    for unknown in ([11, 10, 10, 10], [-6, 3, 3, 3], [4, 3, 3, 3]):
        with pytest.raises(AggregationInputError) as err:
            agg.weights(_teachers(), AggregationContext(domains=torch.tensor(unknown)))
        assert str(err.value) == (f"domain(s) [{unknown[0]}] have no route; known domains are [-5, 3, 10]. Add "
                                  "them to domain_to_teacher / domain_weights")


def test_one_route_for_every_position() -> None:
    agg = RoutingAggregator(3, domain_weights={2: [0, 1, 1]})
    w = agg.weights(_teachers(), AggregationContext(domains=torch.full((4,), 2)))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 0.5]] * 4))


@pytest.mark.parametrize("domains", [None, torch.zeros(3, dtype=torch.int64), torch.zeros(4, 1, dtype=torch.int64)])
def test_domains_of_the_wrong_shape_are_refused_with_the_shape(domains: torch.Tensor | None) -> None:
    agg = RoutingAggregator(3, domain_to_teacher={0: 1})
    with pytest.raises(AggregationInputError) as err:
        agg.weights(_teachers(), AggregationContext(domains=domains))
    got = None if domains is None else tuple(domains.shape)
    assert str(err.value) == (f"'routing' needs ctx.domains of shape (4,), got {got}; pass the domain code "
                              "of every position in AggregationContext")


@pytest.mark.parametrize("key", ["X1", "-X1", "1X"])
def test_only_optionally_signed_digit_strings_are_codes(key: str) -> None:
    with pytest.raises(AggregationConfigError) as err:
        _resolve({"domain_weights": {key: [1, 1, 1], "web": [1, 0, 0], "code": [1, 0, 0], "math": [1, 0, 0]}})
    assert str(err.value) == f"routing: domain {key!r} is not known; the domains are ['web', 'code', 'math']"


def test_a_cache_without_domains_is_refused_with_the_fix() -> None:
    with pytest.raises(AggregationConfigError) as err:
        _resolve({"domain_weights": {0: [1, 1, 1]}}, domains=())
    assert str(err.value) == ("routing needs a cache with domains, and this one has none; prepare it "
                              "with a domain column (mtkd-cache prepare --domain-column)")


def test_weights_are_float32_whatever_the_default_dtype() -> None:
    agg = RoutingAggregator(2, domain_weights={0: [1, 3], 1: [1, 0]})
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = agg.weights(_teachers(2), AggregationContext(domains=torch.tensor([1, 0, 0, 1])))
    finally:
        torch.set_default_dtype(old)
    assert w is not None and w.dtype == torch.float32
    assert w.tolist() == [[1.0, 0.0], [0.25, 0.75], [0.25, 0.75], [1.0, 0.0]]
