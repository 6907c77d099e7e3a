"""Evaluation on a held-out cache: the student's perplexity or accuracy, ECE and (optionally)
MC-dropout predictive uncertainty; and each cached teacher's own scores, read from its targets
(no teacher is loaded).

For causal LMs every real position j with a next token j+1 counts; for classifiers every sample.
With a stored loss mask (instruction data) only rows whose next token is marked count, so the
perplexity is the assistant-token perplexity; in packed inputs a document's last row (whose next
token begins another document) does not count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mtkd_cache import CacheReader
from mtkd_train.rows import row_labels
from mtkd_train.student import Student
from mtkd_train.uncertainty import (
    calibration_bins,
    ece_from_bins,
    expected_calibration_error,
    mc_dropout_predict,
)

__all__ = ["eval_batches", "evaluate_student", "evaluate_teachers"]


def eval_batches(reader: CacheReader, batch_size: int, max_samples: int | None = None,
                 pad_id: int = 0, *, rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """Sequential batches of the cache's inputs (no targets), in sample order.

    Batches are numbered across chunks; with `world > 1` this rank gets batches j with
    j % world == rank, and a chunk holding none of them is not read (not decoded).
    """
    seen, j = 0, 0
    for c in range(reader.num_chunks):
        start, end = reader.inputs.grid.sample_range(c)
        n = end - start if max_samples is None else min(end - start, max_samples - seen)
        if n <= 0:
            return
        count = -(-n // batch_size)
        mine = [b for b in range(count) if (j + b) % world == rank]
        seen, j = seen + n, j + count
        if mine:
            data = reader.read_chunk(c)
            for b in mine:
                yield _batch(data, list(range(b * batch_size, min(n, (b + 1) * batch_size))), pad_id)


def _batch(data: Any, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """The inputs (and labels) of samples `idx` of a decoded chunk, padded to their longest."""
    batch: dict[str, torch.Tensor] = {"sample_ids": torch.as_tensor(data.sample_ids[idx])}
    if "token_ids" in data.inputs:
        L = int(data.lengths[idx].max())
        ids = torch.full((len(idx), L), pad_id, dtype=torch.long)
        real = torch.zeros((len(idx), L), dtype=torch.bool)
        for b, i in enumerate(idx):
            o, n_i = int(data.offsets[i]), int(data.lengths[i])
            ids[b, :n_i] = torch.from_numpy(data.inputs["token_ids"][o : o + n_i])
            real[b, :n_i] = True
        batch.update(input_ids=ids, attention_mask=real.long(), position_mask=real)
        batch.update(_token_extras(data, idx, L))
    else:
        batch.update({k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in data.inputs.items()})
    if data.labels is not None:
        batch["labels"] = torch.as_tensor(data.labels[idx])
    if data.domains is not None:
        batch["domains"] = torch.as_tensor(data.domains[idx])
    return batch


def _token_extras(data: Any, idx: list[int], length: int) -> dict[str, torch.Tensor]:
    """The loss mask and document-start marks of samples `idx`, (B, L) bool, when the chunk has them."""
    out: dict[str, torch.Tensor] = {}
    for key in ("loss_mask", "doc_start"):
        if key in data.inputs:
            arr = torch.zeros((len(idx), length), dtype=torch.bool)
            for b, i in enumerate(idx):
                o, n_i = int(data.offsets[i]), int(data.lengths[i])
                arr[b, :n_i] = torch.from_numpy(data.inputs[key][o : o + n_i])
            out[key] = arr
    return out


def _teacher_token_rows(data: Any, take: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows scored for a token-grid teacher and their next tokens: as the student's (`row_labels`)."""
    toks = data.inputs["token_ids"]
    keep = np.ones(len(toks), dtype=bool)
    for key in ("loss_mask", "doc_start"):
        if key in data.inputs:  # the next token is marked / lies in the same document
            keep &= data.inputs[key] if key == "loss_mask" else ~data.inputs[key]
    rows: list[int] = []
    for o, n_i in zip(data.offsets[:take], data.lengths[:take]):
        rows.extend(j for j in range(int(o), int(o + n_i - 1)) if keep[j + 1])
    rows_a = np.asarray(rows, dtype=np.int64)
    return rows_a, toks[rows_a + 1].astype(np.int64)


_BINS = 15


class _Totals:
    """Device-side sums of an evaluation; one all-reduce merges the ranks' shares.

    Layout of `sums` (float64): nll, count, correct, then the ECE bins (3 x 15); with MC dropout
    also mc_nll, mc_correct, predictive entropy, mutual information and the MC ECE bins.
    """

    def __init__(self, device: torch.device, mc: bool, domains: Sequence[str] = ()):
        self.mc, self.domains = mc, list(domains)
        self.sums = torch.zeros(3 + 3 * _BINS + (4 + 3 * _BINS if mc else 0), dtype=torch.float64, device=device)
        self.by_domain = torch.zeros((len(self.domains), 3), dtype=torch.float64, device=device)  # nll, count, correct

    def add(self, z: torch.Tensor, t: torch.Tensor, d: torch.Tensor | None = None) -> None:
        """Scored rows: logits z (P, V) float32, labels t (P,), domain codes d (P,) (-1 = none)."""
        logp = torch.log_softmax(z, -1)
        conf, pred = logp.max(-1)
        hit = pred == t
        nll = -logp.gather(1, t[:, None]).squeeze(1)
        head = torch.stack([nll.sum(), torch.tensor(t.numel(), device=z.device), hit.sum()])
        self.sums[:3] += head.double()
        self.sums[3 : 3 + 3 * _BINS] += calibration_bins(conf.exp(), hit, _BINS).flatten()
        if d is not None and self.domains:
            known = d >= 0
            rows = torch.stack([nll, torch.ones_like(nll), hit.to(nll.dtype)], 1)[known].double()
            self.by_domain.index_add_(0, d[known], rows)

    def add_mc(self, mean_probs: torch.Tensor, entropy: torch.Tensor, mi: torch.Tensor, t: torch.Tensor) -> None:
        """One batch's MC-dropout prediction: mean probabilities (P, V), entropy and MI (P,)."""
        conf, pred = mean_probs.max(-1)
        hit = pred == t
        nll = -torch.log(mean_probs.gather(1, t[:, None]).clamp_min(1e-12)).sum()
        o = 3 + 3 * _BINS
        self.sums[o : o + 4] += torch.stack([nll, hit.sum(), entropy.sum(), mi.sum()]).double()
        self.sums[o + 4 :] += calibration_bins(conf, hit, _BINS).flatten()

    def reduce(self, world: int) -> None:
        if world > 1:
            dist.all_reduce(self.sums)
            dist.all_reduce(self.by_domain)

    def result(self, task: str, mc_samples: int) -> dict[str, Any]:
        v = self.sums.cpu()
        nll, count, correct = float(v[0]), int(v[1]), float(v[2])
        n = max(count, 1)
        out: dict[str, Any] = {"positions" if task == "causal_lm" else "samples": count, "accuracy": correct / n,
                               "nll": nll / n, "ece": ece_from_bins(v[3 : 3 + 3 * _BINS].view(3, _BINS))}
        if task == "causal_lm":
            out["perplexity"] = math.exp(out["nll"])
        if self.domains:
            out["domains"] = {name: _domain_result(task, *map(float, row))
                              for name, row in zip(self.domains, self.by_domain.cpu()) if row[1] > 0}
        if self.mc:
            o = 3 + 3 * _BINS
            out["mc"] = {"samples": mc_samples, "accuracy": float(v[o + 1]) / n,
                         "ece": ece_from_bins(v[o + 4 :].view(3, _BINS)), "nll": float(v[o]) / n,
                         "predictive_entropy": float(v[o + 2]) / n, "mutual_information": float(v[o + 3]) / n}
        return out


def _domain_result(task: str, nll: float, count: float, correct: float) -> dict[str, Any]:
    out: dict[str, Any] = {"positions" if task == "causal_lm" else "samples": int(count), "accuracy": correct / count,
                           "nll": nll / count}
    if task == "causal_lm":
        out["perplexity"] = math.exp(out["nll"])
    return out


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


@torch.no_grad()
def evaluate_student(student: Student, reader: CacheReader, *, batch_size: int = 16, max_samples: int | None = None,
                     mc_samples: int = 0, device: torch.device | None = None, vocab_size: int | None = None,
                     amp_dtype: torch.dtype | None = None, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Perplexity (causal LM) or accuracy (classifier), ECE, and MC-dropout uncertainty if asked.

    On a cache with a domain column the result also holds `domains`: per domain, the same
    perplexity (or accuracy) and NLL over its samples' scored rows.

    Everything is reduced on `device` (no `(P, V)` probabilities leave it), under autocast when
    `amp_dtype` is given. With `world > 1` rank r scores batches r, r + W, ... and the totals are
    all-reduced: every rank must call it, and every rank gets the same result.
    """
    device = device or torch.device("cpu")
    was_training = student.module.training
    student.module.eval()
    totals = _Totals(device, mc_samples > 0, reader.inputs.domains or ())
    try:
        for batch in eval_batches(reader, batch_size, max_samples, rank=rank, world=world):
            batch = {k: v.to(device) for k, v in batch.items()}
            y = row_labels(batch, student.task)  # (B, T)
            keep = y != -100
            with _autocast(device, amp_dtype):
                z = _rows_logits(student, batch, keep, vocab_size)  # (P, V)
            totals.add(z, y[keep], _row_domains(batch, keep))
            if mc_samples > 0:
                student.module.train()
                with _autocast(device, amp_dtype):
                    pred = mc_dropout_predict(partial(_rows_logits, student, batch, keep, z.shape[-1]), mc_samples)
                student.module.eval()
                totals.add_mc(pred.mean_probs, pred.predictive_entropy, pred.mutual_information, y[keep])
    finally:
        student.module.train(was_training)
    totals.reduce(world)
    out = totals.result(student.task, mc_samples)
    if student.task == "causal_lm":
        out["scored"] = "loss_mask" if reader.inputs.arrays.get("loss_mask") else "all"
    return out


def _row_domains(batch: dict[str, torch.Tensor], keep: torch.Tensor) -> torch.Tensor | None:
    """Each scored row's domain code (its sample's), or None when the cache has no domains."""
    d = batch.get("domains")
    if d is None:
        return None
    return d.view(-1, *([1] * (keep.dim() - 1))).expand_as(keep)[keep]


def _rows_logits(student: Student, batch: dict[str, torch.Tensor], keep: torch.Tensor, vocab: int | None
                 ) -> torch.Tensor:
    """One forward: float32 logits of the scored rows, (P, V); dropout as the module's mode says."""
    logits = student.forward(batch)[0]
    return (logits[..., :vocab] if vocab else logits)[keep].float()


def _teacher_rows(block: Any, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the kept ids (R, K), their probabilities (R, K) and the per-token spread tail (R,).

    `block` is a `TopkBlock` or `SampledBlock`, or a cross-tokenizer teacher's aligned block (`_align`)."""
    if not hasattr(block, "logp"):  # sampled counts (also a cross-tokenizer teacher's, identity map)
        p = block.counts / np.maximum(block.counts.sum(-1, keepdims=True), 1)
        return block.indices, p, np.zeros(len(p))
    p = np.exp(block.logp)
    p = p * (1 - block.tail)[:, None] / np.maximum(p.sum(-1, keepdims=True), 1e-12)  # renormalise codes
    return block.indices, p, block.tail / max(vocab - block.indices.shape[1], 1)


def _teacher_chunks(reader: CacheReader, name: str) -> Iterator[tuple[Any, Any, np.ndarray | None]]:
    """(chunk, teacher block, student rows it covers or None) per chunk; a teacher on its own tokenization
    is aligned onto the student's rows and vocabulary first (`present` marks the rows it covers)."""
    from mtkd_train.data._align import cross_teachers, read_chunk_aligned

    cross = cross_teachers(reader, [name])
    for c in range(reader.num_chunks):
        data = read_chunk_aligned(reader, c, [name], None, cross)  # = reader.read_chunk when not cross
        block = data.targets[name]
        yield data, block, getattr(block, "present", None)


def evaluate_teachers(reader: CacheReader, teachers: Sequence[str], max_samples: int | None = None) -> dict[str, Any]:
    """Each teacher's perplexity/accuracy/ECE on the cache's inputs, from its cached targets.

    A true token outside a teacher's top-k gets that teacher's tail spread uniformly over the
    unkept tokens (a lower bound on the teacher's real probability mass there is not known).
    A teacher on its own tokenization (docs/CROSS_TOKENIZER.md) is scored on the student's tokens,
    with its targets aligned and mapped onto the student's vocabulary: only the rows it is aligned
    with count, and `aligned` gives their share of the rows scored for the others.
    """
    from mtkd_train.data._align import student_meta

    out: dict[str, Any] = {}
    for name in teachers:
        meta = student_meta(reader, reader.teacher(name).meta)
        if meta.target.kind == "none":  # a feature-only teacher has no distribution to score
            continue
        nll, count, correct, confs, oks = 0.0, 0, 0, [], []
        seen, rows_all = 0, 0
        for data, block, present in _teacher_chunks(reader, name):
            idx, p, spread = _teacher_rows(block, meta.vocab_size)
            # the same samples as `evaluate_student`: the first `max_samples`, labelled ones only
            take = len(data.sample_ids) if max_samples is None else min(len(data.sample_ids), max_samples - seen)
            if meta.grid == "token":
                rows_a, y = _teacher_token_rows(data, take)
            else:
                labels = data.labels[:take] if data.labels is not None else np.full(take, -100)
                rows_a = np.flatnonzero(labels >= 0)
                y = labels[rows_a]
            rows_all += len(rows_a)
            if present is not None:  # cross-tokenizer: its aligned rows only
                rows_a, y = rows_a[present[rows_a]], y[present[rows_a]]
            hit = idx[rows_a] == y[:, None]
            py = np.where(hit.any(-1), (p[rows_a] * hit).sum(-1), spread[rows_a])
            nll += float(-np.log(np.maximum(py, 1e-12)).sum())
            count += len(y)
            top = idx[rows_a, p[rows_a].argmax(-1)]
            correct += int((top == y).sum())
            confs.append(p[rows_a].max(-1))
            oks.append(top == y)
            seen += take
            if max_samples is not None and seen >= max_samples:
                break
        res: dict[str, Any] = {"accuracy": correct / max(count, 1), "nll": nll / max(count, 1),
               "ece": expected_calibration_error(confidences=torch.as_tensor(np.concatenate(confs)),
                                                 correct=torch.as_tensor(np.concatenate(oks)))}
        if meta.tokenization is not None:
            res.update(positions=count, aligned=count / max(rows_all, 1))
        if meta.target.kind == "sample":  # counts give 0 to undrawn tokens: the NLL is not a likelihood
            res["nll"] = None
        elif meta.grid == "token":
            res["perplexity"] = math.exp(res["nll"])
        out[name] = res
    return out
