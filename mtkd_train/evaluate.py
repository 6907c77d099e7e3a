"""Evaluation on a held-out cache: the student's perplexity or accuracy, ECE and (optionally)
MC-dropout predictive uncertainty; and each cached teacher's own scores, read from its targets
(no teacher is loaded).

For causal LMs every real position j with a next token j+1 counts; for classifiers every sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from mtkd_cache import CacheReader, SampledBlock, TopkBlock
from mtkd_train.student import Student
from mtkd_train.uncertainty import expected_calibration_error, mc_dropout_predict

__all__ = ["eval_batches", "evaluate_student", "evaluate_teachers"]


def eval_batches(reader: CacheReader, batch_size: int, max_samples: int | None = None,
                 pad_id: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Sequential batches of the cache's inputs (no targets), in sample order."""
    seen = 0
    for c in range(reader.num_chunks):
        data = reader.read_chunk(c)
        n = len(data.sample_ids)
        for s in range(0, n, batch_size):
            idx = list(range(s, min(n, s + batch_size)))
            if max_samples is not None:
                idx = idx[: max(0, max_samples - seen)]
            if not idx:
                return
            seen += len(idx)
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
            else:
                batch.update({k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in data.inputs.items()})
            if data.labels is not None:
                batch["labels"] = torch.as_tensor(data.labels[idx])
            yield batch


def _labels(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    from mtkd_train.objective import row_labels

    return row_labels(batch, task)


@torch.no_grad()
def evaluate_student(student: Student, reader: CacheReader, *, batch_size: int = 16, max_samples: int | None = None,
                     mc_samples: int = 0, device: torch.device | None = None, vocab_size: int | None = None
                     ) -> dict[str, Any]:
    """Perplexity (causal LM) or accuracy (classifier), ECE, and MC-dropout uncertainty if asked."""
    device = device or torch.device("cpu")
    was_training = student.module.training
    student.module.eval()
    nll, count, correct = 0.0, 0, 0
    probs_all, labels_all, pe_all, mi_all, mc_probs = [], [], [], [], []
    for batch in eval_batches(reader, batch_size, max_samples):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits, _ = student.forward(batch)
        logits = logits[..., :vocab_size] if vocab_size else logits
        y = _labels(batch, student.task)  # (B, T)
        keep = y != -100
        z, t = logits[keep].float(), y[keep]
        logp = torch.log_softmax(z, -1)
        nll += float(-logp.gather(1, t[:, None]).sum())
        count += int(t.numel())
        correct += int((z.argmax(-1) == t).sum())
        probs_all.append(logp.exp().cpu())
        labels_all.append(t.cpu())
        if mc_samples > 0:
            student.module.train()
            pred = mc_dropout_predict(partial(_rows_logits, student, batch, keep, z.shape[-1]), mc_samples)
            student.module.eval()
            pe_all.append(pred.predictive_entropy.cpu())
            mi_all.append(pred.mutual_information.cpu())
            mc_probs.append(pred.mean_probs.cpu())
    if was_training:
        student.module.train()
    probs, labels = torch.cat(probs_all), torch.cat(labels_all)
    out: dict[str, Any] = {"positions" if student.task == "causal_lm" else "samples": count,
                           "accuracy": correct / max(count, 1), "nll": nll / max(count, 1),
                           "ece": expected_calibration_error(probs, labels)}
    if student.task == "causal_lm":
        out["perplexity"] = math.exp(out["nll"])
    if mc_samples > 0:
        mp = torch.cat(mc_probs)
        out["mc"] = {"samples": mc_samples, "accuracy": float((mp.argmax(-1) == labels).float().mean()),
                     "ece": expected_calibration_error(mp, labels),
                     "nll": float(-torch.log(mp.gather(1, labels[:, None]).clamp_min(1e-12)).mean()),
                     "predictive_entropy": float(torch.cat(pe_all).mean()),
                     "mutual_information": float(torch.cat(mi_all).mean())}
    return out


def _rows_logits(student: Student, batch: dict[str, torch.Tensor], keep: torch.Tensor, vocab: int) -> torch.Tensor:
    """One stochastic forward (dropout on): logits of the scored rows, (P, V)."""
    return student.forward(batch)[0][..., :vocab][keep].float()


def _teacher_rows(block: TopkBlock | SampledBlock, vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the kept ids (R, K), their probabilities (R, K) and the per-token spread tail (R,)."""
    if isinstance(block, SampledBlock):
        p = block.counts / np.maximum(block.counts.sum(-1, keepdims=True), 1)
        return block.indices, p, np.zeros(len(p))
    p = np.exp(block.logp)
    p = p * (1 - block.tail)[:, None] / np.maximum(p.sum(-1, keepdims=True), 1e-12)  # renormalise codes
    return block.indices, p, block.tail / max(vocab - block.indices.shape[1], 1)


def evaluate_teachers(reader: CacheReader, teachers: Sequence[str], max_samples: int | None = None) -> dict[str, Any]:
    """Each teacher's perplexity/accuracy/ECE on the cache's inputs, from its cached targets.

    A true token outside a teacher's top-k gets that teacher's tail spread uniformly over the
    unkept tokens (a lower bound on the teacher's real probability mass there is not known).
    """
    out: dict[str, Any] = {}
    for name in teachers:
        meta = reader.teacher(name).meta
        nll, count, correct, confs, oks = 0.0, 0, 0, [], []
        seen = 0
        for c in range(reader.num_chunks):
            data = reader.read_chunk(c, teachers=[name])
            idx, p, spread = _teacher_rows(data.targets[name], meta.vocab_size)
            # the same samples as `evaluate_student`: the first `max_samples`, labelled ones only
            take = len(data.sample_ids) if max_samples is None else min(len(data.sample_ids), max_samples - seen)
            if meta.grid == "token":
                toks = data.inputs["token_ids"]
                rows: list[int] = []
                ys: list[int] = []
                for o, n_i in zip(data.offsets[:take], data.lengths[:take]):
                    rows.extend(range(int(o), int(o + n_i - 1)))
                    ys.extend(toks[int(o) + 1 : int(o + n_i)].tolist())
                rows_a, y = np.asarray(rows, dtype=np.int64), np.asarray(ys, dtype=np.int64)
            else:
                labels = data.labels[:take] if data.labels is not None else np.full(take, -100)
                rows_a = np.flatnonzero(labels >= 0)
                y = labels[rows_a]
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
        if meta.target.kind == "sample":  # counts give 0 to undrawn tokens: the NLL is not a likelihood
            res["nll"] = None
        elif meta.grid == "token":
            res["perplexity"] = math.exp(res["nll"])
        out[name] = res
    return out
