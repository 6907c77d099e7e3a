"""`Objective`: every operator x divergence x tail mode trains on real cached targets.

The student here is a free logit tensor (and a fixed hidden state for the gate / feature
projections), so each case isolates the objective and costs milliseconds; `test_recipe.py` runs
the same operators through the real trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F

from mtkd_train.aggregate import AGGREGATORS, AggregationContext, Aggregator, GateNetwork
from mtkd_train.config import TrainConfig
from mtkd_train.data import CachedDistillDataset
from mtkd_train.losses import FeatureDistiller
from mtkd_train.objective import Objective, row_labels, row_targets
from tests.mtkd_train._train_target import VOCAB, LMCache

OPERATORS = (
    "mean",
    "loglinear",
    "entropy",
    "confidence",
    "label_aware",
    "gate",
    "routing",
    "mtbkd",
)
LOSSES = ("forward_kl", "reverse_kl", "js", "tv", "skew_kl", "skew_reverse_kl")
TAILS = ("bucket", "spread")
HIDDEN = 8


@pytest.fixture(scope="module")
def batch(lm_cache: LMCache) -> dict[str, Any]:
    ds = CachedDistillDataset(
        lm_cache.cache, ["a", "b"], features={"a": [-1]}, batch_size=6, shuffle=False
    )
    return next(iter(ds))


def _objective(aggregate: str, loss: str, tail: str, alpha: float = 0.5, **kw: Any) -> Objective:
    akw: dict[str, Any] = {"domain_to_teacher": {0: 0, 1: 1}} if aggregate == "routing" else {}
    gate = GateNetwork(HIDDEN, 2, gate_hidden=8) if aggregate == "gate" else None
    return Objective(
        teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB,
        aggregate=aggregate, aggregate_kwargs=akw, loss=loss, tail_mode=tail, alpha=alpha,
        temperature=2.0, gate=gate, gate_entropy=0.01, **kw,
    )  # fmt: skip


def _student(batch: dict[str, Any], width: int = VOCAB + 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Free logits (B, L, width) with a padded head, and a fixed hidden state (B, L, HIDDEN)."""
    g = torch.Generator().manual_seed(0)
    b, length = batch["input_ids"].shape
    logits = torch.randn(b, length, width, generator=g).requires_grad_()
    hidden = torch.randn(b, length, HIDDEN, generator=g)
    return logits, hidden


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("aggregate", OPERATORS)
def test_every_operator_loss_and_tail_mode_trains(
    batch: dict[str, Any], aggregate: str, loss: str, tail: str
) -> None:
    torch.manual_seed(0)
    objective = _objective(aggregate, loss, tail)
    logits, hidden = _student(batch)
    opt = torch.optim.Adam([logits, *objective.parameters()], lr=0.1)
    history = []
    for _ in range(5):
        terms = objective(batch, logits, hidden, "causal_lm")
        assert all(bool(torch.isfinite(v).all()) for v in terms.values()), terms
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        # the gate's target moves with its own scoring rule, so for it track the gate's objective
        second = terms["gate_nll"] if aggregate == "gate" else terms["kd"]
        history.append((float(terms["loss"].detach()), float(second.detach())))
    # With `gate` the KD target moves as the gate learns its own scoring rule, so only the gate's NLL
    # is monotone there; every other operator has a fixed target and its total and KD terms go down.
    if aggregate != "gate":
        assert history[-1][0] < history[0][0], history
    assert history[-1][1] < history[0][1], history  # the KD term (the gate's NLL for `gate`) goes down
    weights = terms.get("gate_weights", terms.get("teacher_weights"))
    if aggregate == "loglinear":
        assert weights is None  # not a mixture
    else:
        assert weights is not None and weights.shape == (2,)
        assert torch.allclose(weights.sum(), torch.tensor(1.0), atol=1e-5)


def test_gate_parameters_learn(batch: dict[str, Any]) -> None:
    objective = _objective("gate", "forward_kl", "bucket")
    logits, hidden = _student(batch)
    before = [p.detach().clone() for p in objective.gate.parameters()]  # type: ignore[union-attr]
    opt = torch.optim.Adam([logits, *objective.parameters()], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        objective(batch, logits, hidden, "causal_lm")["loss"].backward()
        opt.step()
    after = list(objective.gate.parameters())  # type: ignore[union-attr]
    assert all(not torch.equal(a, b) for a, b in zip(after, before))


def test_loss_is_alpha_mix_of_kd_and_next_token_ce(batch: dict[str, Any]) -> None:
    logits, hidden = _student(batch)
    terms = {a: _objective("entropy", "js", "bucket", alpha=a)(batch, logits, hidden, "causal_lm")
             for a in (0.0, 0.3, 1.0)}  # fmt: skip
    kd, ce = terms[0.3]["kd"], terms[0.3]["ce"]
    assert torch.allclose(terms[0.3]["loss"], 0.3 * kd + 0.7 * ce)
    assert torch.allclose(terms[1.0]["loss"], kd) and torch.allclose(terms[0.0]["loss"], ce)
    # CE is on the next real token of each real position, over the real vocabulary only
    # (the padded head columns are not tokens)
    ids, real = batch["input_ids"], batch["position_mask"]
    z, y = [], []
    for b in range(ids.shape[0]):
        n = int(real[b].sum())
        z.append(logits[b, : n - 1, :VOCAB])
        y.append(ids[b, 1:n])
    assert torch.allclose(ce, F.cross_entropy(torch.cat(z), torch.cat(y)))


def test_row_labels_shift_and_mask_padding(batch: dict[str, Any]) -> None:
    labels = row_labels(batch, "causal_lm")
    ids, real = batch["input_ids"], batch["position_mask"]
    for b in range(ids.shape[0]):
        n = int(real[b].sum())
        assert labels[b, : n - 1].tolist() == ids[b, 1:n].tolist()
        assert (labels[b, n - 1 :] == -100).all()


def test_zero_weight_teacher_is_ignored(batch: dict[str, Any]) -> None:
    """mean with weights (1, 0) is the single-teacher objective on teacher a."""
    logits, hidden = _student(batch)
    both = _objective("mean", "forward_kl", "bucket")
    both.aggregator = Objective(
        teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB,
        aggregate="mean", aggregate_kwargs={"weights": [1, 0]}, loss="forward_kl",
        tail_mode="bucket", alpha=1.0, temperature=2.0,
    ).aggregator  # fmt: skip
    alone = Objective(
        teachers=["a"], capture_temperatures=[1.0], vocab_size=VOCAB, aggregate="mean",
        aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket", alpha=1.0, temperature=2.0,
    )  # fmt: skip
    kd_both = both(batch, logits, hidden, "causal_lm")["kd"]
    kd_alone = alone(batch, logits, hidden, "causal_lm")["kd"]
    assert torch.allclose(kd_both, kd_alone, atol=1e-6)


def test_row_targets_retemper_only_when_temperatures_differ(batch: dict[str, Any]) -> None:
    rows = batch["position_mask"]
    target = batch["targets"]["a"]
    same = row_targets(target, rows, 2.0, VOCAB, temperature=2.0)
    assert torch.equal(same.logp, target["logp"][rows])
    hot = row_targets(target, rows, 1.0, VOCAB, temperature=2.0)
    # tempering flattens: the top token loses mass and the tail gains it
    assert (hot.logp[:, 0] < same.logp[:, 0]).all()
    assert (hot.tail >= same.tail - 1e-6).all()


def test_feature_term_is_added_and_learns(batch: dict[str, Any]) -> None:
    dim = batch["features"]["a"]
    (key,) = dim
    feats = FeatureDistiller(HIDDEN, [dim[key].shape[-1]], kind="mse", betas=[1.0])
    objective = _objective("mean", "forward_kl", "bucket", features=feats, feature_keys={"a": key})
    logits, hidden = _student(batch)
    opt = torch.optim.Adam(objective.parameters(), lr=0.05)
    history = []
    for _ in range(10):
        terms = objective(batch, logits, hidden, "causal_lm")
        opt.zero_grad()
        terms["feat"].backward()
        opt.step()
        history.append(float(terms["feat"].detach()))
        assert torch.allclose(terms["loss"], 0.5 * terms["kd"] + 0.5 * terms["ce"] + terms["feat"])
    assert history[-1] < 0.8 * history[0], history


def test_each_feature_term_reads_its_own_student_layer(batch: dict[str, Any]) -> None:
    (key,) = batch["features"]["a"]
    width = batch["features"]["a"][key].shape[-1]
    torch.manual_seed(0)
    feats = FeatureDistiller(HIDDEN, [width], kind="mse", betas=[1.0])
    objective = _objective("mean", "forward_kl", "bucket", features=feats, feature_keys={"a": key},
                           feature_layers={"a": 1})  # fmt: skip
    assert objective.hidden_layers == (1,)
    logits, last = _student(batch)
    middle = torch.randn_like(last)
    got = objective(batch, logits, {1: middle, -1: last}, "causal_lm")["feat"]
    rows = batch["position_mask"]
    assert torch.allclose(got, feats(middle[rows], [batch["features"]["a"][key][rows]]))
    assert not torch.allclose(got, feats(last[rows], [batch["features"]["a"][key][rows]]))


@dataclass(frozen=True)
class _LabelPeek(Aggregator):
    """A new operator, known only to the registry: all weight on teacher 0 where the label is even."""

    num_teachers: int
    context: ClassVar[frozenset[str]] = frozenset({"labels"})

    def _weights(self, targets: Any, ctx: AggregationContext, vocab_size: int | None) -> torch.Tensor:
        assert ctx.labels is not None and ctx.domains is None and ctx.gate_logits is None
        even = (ctx.labels % 2 == 0).float().unsqueeze(1)  # (P, 1)
        return torch.cat([even, 1 - even], dim=1)


def test_a_new_operator_needs_only_the_registry(
    batch: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(AGGREGATORS, "label_peek", _LabelPeek)
    TrainConfig(cache="c", teachers=("a", "b"), student="s", aggregate="label_peek")  # a known name
    objective = _objective("label_peek", "forward_kl", "spread")
    assert objective.gate is None and objective.hidden_layers == ()
    logits, _ = _student(batch)
    terms = objective(batch, logits, None, "causal_lm")
    labels = row_labels(batch, "causal_lm")[batch["position_mask"]]
    share = float((labels % 2 == 0).float().mean())
    assert terms["teacher_weights"].tolist() == pytest.approx([share, 1 - share])


def test_gate_is_built_from_the_operators_declaration(batch: dict[str, Any]) -> None:
    objective = Objective(
        teachers=["a", "b"], capture_temperatures=[1.0, 1.0], vocab_size=VOCAB, aggregate="gate",
        aggregate_kwargs={}, loss="forward_kl", tail_mode="bucket", alpha=0.5, temperature=1.0,
        hidden_size=HIDDEN,
    )  # fmt: skip
    assert isinstance(objective.gate, GateNetwork) and objective.hidden_layers == (-1,)
    logits, hidden = _student(batch)
    assert objective(batch, logits, hidden, "causal_lm")["gate_weights"].tolist() == pytest.approx([0.5, 0.5])
