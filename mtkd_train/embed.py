"""Distil encoders and embedding models from feature-only teachers (no KD or CE term).

When every teacher of a run is feature-only (cached by `mtkd-cache run --features` from a model
without a head: target kind `none`), there is no distribution to match: the objective is the
feature loss alone (`losses.FeatureDistiller`: mse / cosine / relational, per-teacher projections or
one mean target). The student is any Hugging Face encoder (`AutoModel` from a config or weights
folder) or a `package.module:function` factory whose forward returns hidden states. Pooled teacher
features (sentence embeddings) are matched by the student's embedding pooled the same way
(`student_pooling`, default the teachers'), and the saved student is a sentence-transformers folder:
`AutoModel.from_pretrained(out/student)` plus `modules.json` and `1_Pooling/config.json` give the
same embeddings. Cost per step: one student forward and backward.

Not built here (the logits recipe has them): checkpoints / resume, DDP, evaluation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtkd_cache import CacheReader, open_cache
from mtkd_cache.format.meta import FeatureSpec as CachedFeature
from mtkd_cache.precompute.pooling import PoolingSpec, pool
from mtkd_train.config import ConfigError, FeatureSpec, TrainConfig
from mtkd_train.data import CachedDistillDataset, validate_teachers
from mtkd_train.encoder_student import load_encoder_student, save_pooling
from mtkd_train.losses import FeatureDistiller
from mtkd_train.optim import build_optimizer
from mtkd_train.rng import seed_all
from mtkd_train.rows import to_device

__all__ = ["FeatureRecipe", "is_feature_only"]

log = logging.getLogger("mtkd_train")


def is_feature_only(reader: CacheReader, teachers: tuple[str, ...] | list[str]) -> bool:
    """True if every named (complete) teacher stores features only (target kind `none`)."""
    names = set(reader.teacher_names)
    return bool(teachers) and all(t in names and reader.teacher(t).meta.target.kind == "none" for t in teachers)


class FeatureRecipe:
    """Train a student from feature-only teachers: `FeatureRecipe(cfg).setup(); .train(); .save()`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.step, self.rank = 0, 0
        self.stopped = False  # no SIGTERM checkpointing on this path yet (the CLI reads it)
        self.losses: list[float] = []

    # -- setup: every check before the first forward ------------------------------------------------
    def setup(self, resume: bool = False) -> FeatureRecipe:
        c = self.cfg
        if resume:
            raise ConfigError("--resume: feature-only runs (teachers without a head) keep no checkpoints yet; "
                              "start a new run with another --out")
        if c.eval_cache:
            raise ConfigError("`eval_cache` (--eval-cache): feature-only runs have no evaluation yet; drop it")
        dev = c.device if c.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(dev)
        seed_all(c.seed)
        self.reader = open_cache(c.cache, dict(c.storage_options) or None)
        self.specs = self._feature_specs()
        validate_teachers(self.reader, list(c.teachers), features={s.teacher: [s.layer] for s in self.specs})
        self.cached = cached = [self._cached(s) for s in self.specs]
        self.pooling = self._pooling(cached)
        self.student = load_encoder_student(c.student, c.student_kwargs, seed=c.seed)
        self._check_student(cached)
        proj = [bool(s.projection) for s in self.specs]  # feature-only default: no projection
        self.distiller = FeatureDistiller(self.student.hidden_size, [f.dim for f in cached], kind=self.specs[0].kind,
                                          betas=[s.beta for s in self.specs], projections=proj,
                                          aggregate=c.feature_aggregate, tau=c.feature_tau)
        self.model = nn.ModuleDict({"student": self.student.module, "distiller": self.distiller}).to(self.device)
        self.optimizer, self.scheduler = build_optimizer(
            [p for p in self.model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay,
            warmup_steps=c.warmup_steps, max_steps=c.max_steps, min_lr_ratio=c.min_lr_ratio, device=self.device)
        self.dataset = CachedDistillDataset(
            self.reader, teachers=list(c.teachers), features={s.teacher: [s.layer] for s in self.specs},
            batch_size=c.batch_size, seed=c.seed, shuffle=True, shuffle_chunks=c.shuffle_chunks)
        return self

    def _feature_specs(self) -> list[FeatureSpec]:
        """`features` per teacher; a teacher not named there uses its (first) cached layer."""
        given = {s.teacher: s for s in self.cfg.feature_specs}
        out = []
        for t in self.cfg.teachers:
            if t not in given:
                layers = [f.layer for f in self.reader.teacher(t).meta.features] if t in self.reader.teacher_names else []
                given[t] = FeatureSpec(t, layers[0] if layers else -1, kind=self.cfg.feature_specs[0].kind
                                       if self.cfg.feature_specs else "mse")
            out.append(given[t])
        return out

    def _cached(self, spec: FeatureSpec) -> CachedFeature:
        return self.reader.teacher(spec.teacher).feature_spec(spec.layer)

    def _pooling(self, cached: list[CachedFeature]) -> PoolingSpec | None:
        """The student's sentence pooling (None: per-position features), from `student_pooling`."""
        pools = sorted({f.pool for f in cached})
        if "none" in pools and len(pools) > 1:
            raise ConfigError(f"`features`: teachers {list(self.cfg.teachers)} mix per-position and pooled features "
                              f"({pools}); distil from one kind, or re-cache with the same --pool")
        if pools == ["none"]:
            return None
        if self.cfg.student_pooling != "auto":
            try:
                return PoolingSpec.parse(self.cfg.student_pooling)
            except ValueError as e:
                raise ConfigError(f"`student_pooling` (--student-pooling) {self.cfg.student_pooling!r}: {e}") from e
        if len(pools) > 1:
            raise ConfigError(f"`student_pooling` auto: the teachers were pooled differently ({pools}); set "
                              f"--student-pooling (e.g. {pools[0]})")
        return PoolingSpec.parse(pools[0])

    def _check_student(self, cached: list[CachedFeature]) -> None:
        s, width = self.student, self.student.hidden_size
        for spec, f in zip(self.specs, cached):
            if not -(s.num_layers + 1) <= spec.student_layer <= s.num_layers:
                raise ConfigError(f"`features`: {spec.teacher}.student_layer {spec.student_layer} is out of range for "
                                  f"student {self.cfg.student!r} with {s.num_layers} layers; use -1 .. {s.num_layers}")
            stud = width * (len(self.pooling.modes) if self.pooling else 1)  # pooled modes are concatenated
            if spec.kind in ("mse", "cosine") and not spec.projection and f.dim != stud:
                raise ConfigError(
                    f"`features`: teacher {spec.teacher!r} has {f.dim}-wide features but student {self.cfg.student!r} "
                    f"gives {stud}-wide ones and no projection was configured; set features.{spec.teacher}.projection "
                    f"= true, use a student of hidden size {f.dim}, or a relational kind (similarity, contrastive)")
        tok = self.reader.inputs.tokenizer
        if tok is not None and s.vocab_size is not None and s.vocab_size < tok.vocab_size:
            raise ConfigError(f"`student` {self.cfg.student!r} embeds {s.vocab_size} tokens but the cache's tokenizer "
                              f"has {tok.vocab_size}; use a student config with vocab_size >= {tok.vocab_size}")

    # -- training ----------------------------------------------------------------------------------
    def embed(self, batch: Mapping[str, Any], layer: int) -> torch.Tensor:
        """The student's features at `layer`: (B, D') pooled like the teachers, or (B, L, D)."""
        h = self.student.hidden(batch, layer)  # (B, L, D)
        if self.pooling is None or h.ndim == 2:
            return h
        mask = batch.get("attention_mask")
        return pool(h, mask if mask is not None else torch.ones(h.shape[:2], device=h.device), self.pooling)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The feature objective of one batch (no KD, no CE)."""
        hs, fs = [], []
        for spec, f in zip(self.specs, self.cached):
            target = batch["features"][spec.teacher][f.name]
            h = self.embed(batch, spec.student_layer)
            if target.ndim == 3:  # per position: the real rows, (P, D)
                keep = batch["position_mask"]
                h, target = h[keep], target[keep]
            hs.append(h)
            fs.append(target)
        return self.distiller(hs, fs)

    def batches(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataset:
            yield to_device(batch, self.device, per_token=False)

    def train(self) -> list[float]:
        """`max_steps` AdamW steps; returns the loss of each step (also in out/metrics.jsonl)."""
        c = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        it = self.batches()
        with (self.out / "metrics.jsonl").open("a") as log_file:
            while self.step < c.max_steps:
                loss = self.loss(next(it))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.clip_grad > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                self.losses.append(float(loss.detach()))
                if self.step % c.log_every == 0 or self.step == c.max_steps:
                    log_file.write(json.dumps({"step": self.step, "loss": self.losses[-1], "feat": self.losses[-1],
                                               "lr": self.scheduler.get_last_lr()[0]}) + "\n")
        return self.losses

    def save(self) -> Path:
        """The student for `AutoModel.from_pretrained`, with the cache's tokenizer and its pooling files."""
        path = self.out / "student"
        self.student.save(path)
        if self.reader.inputs.tokenizer is not None:
            self.reader.load_tokenizer().save_pretrained(str(path))
        if self.pooling is not None:
            save_pooling(path, self.pooling, self.student.hidden_size)
        return path

    def evaluate(self, teachers: bool = True) -> dict[str, Any] | None:
        return None

    def close(self) -> None:
        return None
