"""The distillation recipe: `setup -> train -> evaluate -> save`, one class, no hooks.

Reads cached teacher targets only (no teacher is ever loaded), aggregates them per position,
and trains the student with alpha * KD + (1 - alpha) * CE (+ feature matching). AdamW with
linear warm-up and cosine decay, gradient accumulation, clipping, bf16/fp16 autocast on GPU (fp16
with a loss scaler), DDP under torchrun (gloo on CPU, nccl on GPU), checkpoints every N steps and
on SIGTERM that resume with the same loss sequence.

`setup` builds everything (`_setup_*`); `_loss_step` is one micro-batch's forward and backward;
`train` is the loop. Logging (`MetricLogger`), checkpoint files (`checkpoint.py`), SIGTERM
(`StopSignal`), RNG state (`rng.py`) and the schedule (`optim.py`) are components the loop calls.
The recipe knows no operator: it asks the registry which context an operator reads. Under torchrun
every rank checks before step 0 that it sees the same `out` and cache (`shared.py`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mtkd_cache import CacheReader, open_cache, verify_cache
from mtkd_train.aggregate import operator_context
from mtkd_train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    teacher_identities,
)
from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.data import CachedDistillDataset, validate_teachers
from mtkd_train.data._align import check_alignment, student_meta
from mtkd_train.evaluate import evaluate_student, evaluate_teachers
from mtkd_train.lora import apply_lora, save_lora_student
from mtkd_train.losses import FeatureDistiller
from mtkd_train.metrics import MetricLogger, write_error
from mtkd_train.objective import Objective
from mtkd_train.optim import build_optimizer, build_scaler
from mtkd_train.rng import gather_rng_states, restore_rng, seed_all
from mtkd_train.rows import to_device
from mtkd_train.scoring import choose_aggregate
from mtkd_train.shared import check_shared
from mtkd_train.signals import StopSignal, own_process_group
from mtkd_train.student import Student, load_student, save_student

__all__ = ["DistillRecipe"]

log = logging.getLogger("mtkd_train")


class _Step(nn.Module):
    """Student + objective in one module, so DDP sees one forward and syncs every parameter."""

    def __init__(self, student: Student, objective: Objective):
        super().__init__()
        self.student_module = student.module
        self.objective = objective
        self._student = student

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        layers = self.objective.hidden_layers or None
        if self.objective.head_fused:  # the loss applies the LM head itself: no (B, T, V) logits
            inputs, hidden = self._student.forward_head(batch, want_hidden=layers)
            return self.objective(batch, inputs, hidden, self._student.task)
        logits, hidden = self._student.forward(batch, want_hidden=layers)
        return self.objective(batch, logits, hidden, self._student.task)


class DistillRecipe:
    """Train a student from an mtkd cache. `DistillRecipe(cfg).setup(resume=...); .train()`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.step = 0
        self.losses: list[float] = []
        self.stopped = False
        """True once `train` returned early on SIGTERM (on every rank): a checkpoint of that step exists."""
        self.metrics: MetricLogger | None = None
        self._resumed_from: int | None = None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> DistillRecipe:
        self._setup_distributed()
        latest = self._check_checkpoints(resume)  # before anything is written to the folder (auto_aggregate.json)
        self._setup_cache()
        fingerprint = json.dumps([self.reader.inputs.dataset_fingerprint, self.teacher_ids], sort_keys=True)
        check_shared(self.out, fingerprint, rank=self.rank, world=self.world, device=self.device)
        self._setup_student()
        self._setup_objective()
        self._setup_optimizer()
        self._setup_data()
        seed_all(self.cfg.seed + self.rank)  # per-rank dropout; model init above used `seed` on every rank
        if resume and latest is not None:  # checked above: a --resume has one
            self._resume(latest)
        return self

    def _check_checkpoints(self, resume: bool) -> Path | None:
        """The latest checkpoint; refuse a --resume without one, or a fresh run into a folder with one."""
        latest = latest_checkpoint(self.out / "checkpoints")
        if resume and latest is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.out / 'checkpoints'}; drop --resume to start")
        if not resume and self.rank == 0 and latest is not None:
            raise CheckpointError(f"{self.out} already holds checkpoints; pass --resume to continue that run or "
                                  f"choose another --out")
        return latest

    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev.startswith("cuda") and self.world > 1:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo",
                                    device_id=self.device if self.device.type == "cuda" else None)
        self.rank = dist.get_rank() if self.world > 1 else 0
        amp = self.cfg.amp
        if amp == "auto":
            amp = "off" if self.device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        seed_all(self.cfg.seed)

    def _setup_cache(self) -> None:
        c = self.cfg
        so = dict(c.storage_options) or None
        self.reader: CacheReader = open_cache(c.cache, so)
        if c.verify_cache and self.rank == 0:
            report = verify_cache(c.cache, progress=False, storage_options=so)
            if not report.ok:
                raise ConfigError(f"cache {c.cache} fails verification: {report.problems[:5]}; "
                                  f"re-run the `mtkd-cache` step it names")
        self.feature_specs = c.feature_specs
        feats = {s.teacher: [s.layer] for s in self.feature_specs}
        validate_teachers(self.reader, list(c.teachers), features=feats or None)
        check_alignment(self.reader, c.teachers, c.min_alignment)  # teachers on another tokenizer
        self.metas = [student_meta(self.reader, self.reader.teacher(t).meta) for t in c.teachers]
        self.vocab_size = self.metas[0].vocab_size
        self.teacher_ids = teacher_identities(self.reader, c.teachers)
        self.eval_reader = self._open_eval_cache() if c.eval_cache else None
        self.aggregate, self.aggregate_kwargs = c.aggregate, dict(c.aggregate_kwargs)
        if c.aggregate == "auto":
            self.aggregate, self.aggregate_kwargs = choose_aggregate(
                self.eval_reader or self.reader, c.teachers, self.out if self.rank == 0 else None)

    def _open_eval_cache(self) -> CacheReader:
        """The held-out cache, checked before step 0: same tokenizer (or input kind), usable teachers."""
        reader = open_cache(self.cfg.eval_cache, dict(self.cfg.storage_options) or None)  # type: ignore[arg-type]
        train_tok, eval_tok = self.reader.inputs.tokenizer, reader.inputs.tokenizer
        same = (train_tok is None and eval_tok is None) or (
            train_tok is not None and eval_tok is not None and train_tok.fingerprint == eval_tok.fingerprint)
        if not same or reader.inputs.kind != self.reader.inputs.kind:
            raise ConfigError(f"`eval_cache` {self.cfg.eval_cache} was prepared with another tokenizer (or input kind) "
                              f"than `cache` {self.cfg.cache}; prepare it with the same --tokenizer")
        present = [t for t in self.cfg.teachers if t in reader.teacher_names]
        if present:
            validate_teachers(reader, present)
        return reader

    def _setup_student(self) -> None:
        c = self.cfg
        arrays = tuple(self.reader.inputs.arrays) if self.reader.inputs.kind == "arrays" else ()
        self.student = load_student(c.student, c.student_kwargs, seed=c.seed, array_keys=arrays or ("pixel_values",),
                                    trust_factory=c.trust_factory)
        size, grid, task, teachers = self.student.output_size, self.metas[0].grid, self.student.task, list(c.teachers)
        if size and size < self.vocab_size:
            raise ConfigError(f"`student` {c.student!r} has {size} outputs but the teachers {teachers} have a "
                              f"vocabulary of {self.vocab_size}; use a student with the teachers' tokenizer / classes")
        if grid == "token" and task != "causal_lm":
            raise ConfigError(f"`student` is a {task} but the teachers store per-token targets; use a causal LM")
        if grid == "sample" and task == "causal_lm":
            raise ConfigError(f"`student` {c.student!r} is a causal LM but the teachers {teachers} store one target "
                              f"per sample ({self.vocab_size} classes); use a classifier student")
        if grid == "sample" and not self.reader.inputs.has_labels and c.alpha < 1:
            raise ConfigError(f"`alpha` is {c.alpha} but the cache {c.cache} has no labels for the CE term; set "
                              f"--alpha 1 (KD only) or prepare the cache with a label column")
        if grid == "sample" and size not in (0, self.vocab_size):
            raise ConfigError(f"`student` {c.student!r} has {size} classes but the teachers {teachers} have "
                              f"{self.vocab_size}; give the student {self.vocab_size} outputs")
        if c.lora_r > 0:
            self.student = apply_lora(self.student, r=c.lora_r, alpha=c.lora_alpha, targets=c.lora_targets, seed=c.seed)
        self.student.module.to(self.device)

    def _hidden_size(self) -> int:
        cfg = getattr(self.student.module, "config", None)
        size = getattr(cfg, "hidden_size", None) or getattr(self.student.module, "hidden_size", None)
        if size is None:
            raise ConfigError(f"`student` {self.cfg.student!r} exposes no hidden_size; gate/feature losses need it")
        return int(size)

    def _setup_objective(self) -> None:
        c, specs = self.cfg, self.feature_specs
        needs_hidden = "gate_logits" in operator_context(self.aggregate) or bool(specs)
        hidden_size = self._hidden_size() if needs_hidden else None
        feats, keys = None, {}
        if specs:
            dims = []
            for s in specs:
                meta = self.metas[list(c.teachers).index(s.teacher)]
                f = next(f for f in meta.features if f.layer == s.layer)
                dims.append(f.dim)
                keys[s.teacher] = f.name
            feats = FeatureDistiller(hidden_size, dims, kind=specs[0].kind,  # type: ignore[arg-type]
                                     betas=[s.beta for s in specs], projections=[s.projection is not False for s in specs],
                                     aggregate=c.feature_aggregate, tau=c.feature_tau)
        self.objective = Objective(
            teachers=c.teachers, capture_temperatures=[m.target.temperature for m in self.metas],
            vocab_size=self.vocab_size, aggregate=self.aggregate, aggregate_kwargs=self.aggregate_kwargs, loss=c.loss,
            tail_mode=c.tail_mode, alpha=c.alpha, temperature=c.temperature, gate_entropy=c.gate_entropy,
            features=feats, feature_keys=keys, feature_layers={s.teacher: s.student_layer for s in specs},
            domains=tuple(self.reader.inputs.domains or ()), hidden_size=hidden_size,
            loss_impl=self._loss_impl(), kernels=c.kernels).to(self.device)
        self.model = _Step(self.student, self.objective)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=c.find_unused_parameters)

    def _loss_impl(self) -> str:
        """Resolve `loss_impl = auto`; refuse fused_head for a student whose logits are not head(decoder(x))."""
        impl, head_ok = self.cfg.loss_impl, None
        if impl in ("auto", "fused_head") and self.cfg.loss == "forward_kl":
            head_ok = self.student.supports_fused_head()
        if impl == "fused_head" and not head_ok:
            raise ConfigError(f"`loss_impl` (--loss-impl) fused_head needs a causal-LM student whose logits are its "
                              f"output embedding applied to its decoder's output; {self.cfg.student!r} is not; use fused")
        if impl == "auto":
            return "reference" if self.cfg.loss != "forward_kl" else ("fused_head" if head_ok else "fused")
        return impl

    def _setup_optimizer(self) -> None:
        c = self.cfg
        self.optimizer, self.scheduler = build_optimizer(
            [p for p in self.model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay,
            warmup_steps=c.warmup_steps, max_steps=c.max_steps, min_lr_ratio=c.min_lr_ratio, device=self.device)
        self.scaler = build_scaler(self.device, self.amp_dtype)

    def _setup_data(self) -> None:
        feats = {s.teacher: [s.layer] for s in self.feature_specs}
        where = self.cfg.merge_in if self.cfg.merge_in != "auto" else ("step" if self.device.type == "cuda" else "loader")
        merge = self.objective.loader_transform(self.student.task) if where == "loader" else None
        self.dataset = CachedDistillDataset(
            self.reader, teachers=list(self.cfg.teachers), features=feats or None, batch_size=self.cfg.batch_size,
            seed=self.cfg.seed, shuffle=True, shuffle_chunks=self.cfg.shuffle_chunks, rank=self.rank,
            world_size=self.world, lanes=self.cfg.lanes, transform=merge)

    def _loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False, worker_init_fn=own_process_group)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint of the current step (a collective under DDP: every rank calls it)."""
        rng = gather_rng_states(self.device, self.world)
        if self.rank != 0:
            return None
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "data": self.dataset.state_dict(), "rng": rng, "losses": list(self.losses),
                 "teachers": self.teacher_ids}
        return save_checkpoint(self.out / "checkpoints", self.step, state, self.cfg)

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, self.cfg, self.teacher_ids)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])  # restores the schedule that was running
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.dataset.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        restore_rng(state["rng"], self.rank, self.device, seed=self.cfg.seed, step=self.step)
        self._resumed_from = self.step
        total = getattr(self.scheduler.lr_lambdas[0], "total_steps", self.cfg.max_steps)
        if total != self.cfg.max_steps and self.rank == 0:
            log.warning("--max-steps is %d but %s started a %d-step schedule; that schedule continues "
                        "(the learning rate stays at its minimum after step %d)", self.cfg.max_steps, path.name,
                        total, total)

    # -- training --------------------------------------------------------------------------------
    def _loss_step(self, step_model: nn.Module, batch: dict[str, Any], last_micro: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns its loss terms (graph-free)."""
        sync = nullcontext() if (self.ddp is None or last_micro) else self.ddp.no_sync()
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with sync:
            with amp:
                terms = step_model(batch)
            self.scaler.scale(terms["loss"] / self.cfg.grad_accum).backward()
        return {k: v.detach() for k, v in terms.items()}

    def _train_step(self, step_model: nn.Module, it: Any) -> tuple[dict[str, float], dict[str, Any]]:
        """One optimizer step over `grad_accum` micro-batches; one host sync for all its scalars."""
        c = self.cfg
        sums: dict[str, Any] = {}
        positions = torch.zeros((), dtype=torch.long, device=self.device)
        for micro in range(c.grad_accum):
            batch = to_device(next(it), self.device, per_token=self.student.task == "causal_lm")
            self.dataset.consumed(1)
            terms = self._loss_step(step_model, batch, micro == c.grad_accum - 1)
            positions += len(batch["row_index"])
            for k, v in terms.items():
                if v.dim() == 0:
                    sums[k] = sums.get(k, 0) + v.float() / c.grad_accum
        if c.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad)
        lr = float(self.scheduler.get_last_lr()[0])  # the rate this step used; step() moves to the next one
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = list(sums)
        values = torch.stack([sums[k].float() for k in names] + [positions.float()]).tolist()
        extra: dict[str, Any] = {k: terms[k].tolist() for k in ("gate_weights", "teacher_weights") if k in terms}
        scalars: dict[str, float] = {"lr": lr, **dict(zip(names, values[:-1]))}
        return scalars, {"positions": values[-1], **extra}

    def train(self) -> list[float]:
        """Run until `max_steps`; return the per-step losses (all of the run, resumed ones included)."""
        c = self.cfg
        stop = StopSignal(self.world, self.device).install()
        if self.rank == 0:
            self.metrics = self._metric_logger()
        step_model = self.ddp or self.model
        step_model.train()
        it = iter(self._loader())
        bar = tqdm(total=c.max_steps, initial=self.step, desc="train", disable=self.rank != 0 or not c.progress)
        positions, t0 = 0.0, time.perf_counter()
        try:
            while self.step < c.max_steps and not stop.should_stop():
                scalars, extra = self._train_step(step_model, it)
                self.step += 1
                self.losses.append(scalars["loss"])
                positions += extra.pop("positions")
                bar.update(1)
                bar.set_postfix(loss=f"{scalars['loss']:.4f}")
                if self.metrics is not None and self.step % c.log_every == 0:
                    rate = positions / max(time.perf_counter() - t0, 1e-9)
                    self.metrics.log(self.step, {**scalars, "positions_per_s": rate}, **extra)
                if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save_checkpoint()
                if c.eval_every and self.step % c.eval_every == 0 and c.eval_cache:
                    self._log_eval()
            self.stopped = stop.stopped and self.step < c.max_steps
            if stop.stopped or not c.checkpoint_every or self.step % c.checkpoint_every:
                self.save_checkpoint()  # the run's last step is always resumable
        finally:
            bar.close()
            stop.restore()
            self._close_metrics()
        return self.losses

    def _metric_logger(self) -> MetricLogger:
        try:
            return MetricLogger(self.out, tensorboard=self.cfg.tensorboard, resume_step=self._resumed_from)
        except ImportError as e:
            raise ConfigError("`tensorboard = true` needs the tensorboard package: pip install tensorboard") from e

    def _log_eval(self) -> dict[str, Any]:
        res = self.evaluate()
        if self.metrics is not None:
            self.metrics.log_eval(self.step, res)
        return res

    def _close_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # -- evaluation and saving -------------------------------------------------------------------
    def evaluate(self, teachers: bool = False) -> dict[str, Any]:
        """Student (and optionally cached teachers) on `eval_cache`.

        The student's batches are split across ranks and reduced on the device (a collective: every
        rank calls it and gets the student's scores); the teachers' scores are on rank 0 only.
        """
        if self.eval_reader is None:
            raise ConfigError("evaluation needs `eval_cache` (--eval-cache): a held-out cache with the same tokenizer")
        c = self.cfg
        res: dict[str, Any] = {"student": evaluate_student(
            self.student, self.eval_reader, batch_size=c.batch_size, max_samples=c.eval_max_samples,
            mc_samples=c.mc_samples, device=self.device, vocab_size=self.vocab_size, amp_dtype=self.amp_dtype,
            rank=self.rank, world=self.world)}
        if teachers and self.rank == 0:  # read from the cache, no forward: rank 0 alone
            present = [t for t in c.teachers if t in self.eval_reader.teacher_names]
            res["teachers"] = evaluate_teachers(self.eval_reader, present, max_samples=c.eval_max_samples)
        return res

    def save(self) -> Path | None:
        """Save the final student under `out/student` (loadable with from_pretrained) and the config."""
        if self.rank != 0:
            return None
        try:
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
            if self.cfg.lora_r > 0:
                return save_lora_student(self.student, self.out / "student", merge=self.cfg.merge_lora)
            return save_student(self.student, self.out / "student")
        except OSError as e:
            raise write_error(self.out / "student", e) from e

    def close(self) -> None:
        """Release what the run holds: the metric log and the process group."""
        self._close_metrics()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

