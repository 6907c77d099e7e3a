"""The distillation recipe: `setup -> train -> evaluate -> save`, one class, no hooks.

Reads cached teacher targets only (no teacher is ever loaded), aggregates them per position,
and trains the student with alpha * KD + (1 - alpha) * CE (+ feature matching). AdamW with
linear warm-up and cosine decay, gradient accumulation, clipping, bf16 autocast on GPU, DDP under
torchrun (gloo on CPU, nccl on GPU), checkpoints every N steps and on SIGTERM that resume with
the same loss sequence.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mtkd_cache import CacheReader, open_cache, verify_cache
from mtkd_train.aggregate import GateNetwork
from mtkd_train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mtkd_train.config import ConfigError, TrainConfig
from mtkd_train.data import CachedDistillDataset, validate_teachers
from mtkd_train.evaluate import evaluate_student, evaluate_teachers
from mtkd_train.losses import FeatureDistiller
from mtkd_train.objective import Objective
from mtkd_train.student import Student, load_student, save_student

__all__ = ["DistillRecipe"]


class _Step(nn.Module):
    """Student + objective in one module, so DDP sees one forward and syncs every parameter."""

    def __init__(self, student: Student, objective: Objective, hidden_layer: int | None):
        super().__init__()
        self.student_module = student.module
        self.objective = objective
        self._student = student
        self.hidden_layer = hidden_layer

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if self.objective.head_fused:  # the loss applies the LM head itself: no (B, T, V) logits
            inputs, hidden = self._student.forward_head(batch, want_hidden=self.hidden_layer)
            return self.objective(batch, inputs, hidden, self._student.task)
        logits, hidden = self._student.forward(batch, want_hidden=self.hidden_layer)
        return self.objective(batch, logits, hidden, self._student.task)


def _lr_lambda(cfg: TrainConfig):  # noqa: ANN202
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class DistillRecipe:
    """Train a student from an mtkd cache. `DistillRecipe(cfg).setup(resume=...); .train()`."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.step = 0
        self.losses: list[float] = []
        self._stop = False

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, resume: bool = False) -> DistillRecipe:
        self._setup_distributed()
        self._setup_cache()
        self._setup_student()
        self._setup_objective()
        self._setup_optimizer()
        self._setup_data()
        if resume:
            self._resume()
        elif self.rank == 0 and latest_checkpoint(self.out / "checkpoints") is not None:
            raise CheckpointError(f"{self.out} already holds checkpoints; pass --resume to continue that run or "
                                  f"choose another --out")
        return self

    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        if dev.startswith("cuda") and self.world > 1:
            dev = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        amp = self.cfg.amp
        if amp == "auto":
            amp = "bf16" if self.device.type == "cuda" else "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        torch.manual_seed(self.cfg.seed)
        random.seed(self.cfg.seed)
        np.random.seed(self.cfg.seed)

    def _setup_cache(self) -> None:
        self.reader: CacheReader = open_cache(self.cfg.cache)
        if self.cfg.verify_cache and self.rank == 0:
            report = verify_cache(self.cfg.cache, progress=False)
            if not report.ok:
                raise ConfigError(f"cache {self.cfg.cache} fails verification: {report.problems[:5]}; "
                                  f"re-run the `mtkd-cache` step it names")
        feats = {t: [int(spec.get("layer", -1))] for t, spec in self.cfg.features.items()}
        validate_teachers(self.reader, list(self.cfg.teachers), features=feats or None)
        self.metas = [self.reader.teacher(t).meta for t in self.cfg.teachers]
        self.vocab_size = self.metas[0].vocab_size

    def _setup_student(self) -> None:
        arrays = tuple(self.reader.inputs.arrays) if self.reader.inputs.kind == "arrays" else ()
        self.student = load_student(self.cfg.student, self.cfg.student_kwargs, seed=self.cfg.seed,
                                    array_keys=arrays or ("pixel_values",))
        if self.student.output_size and self.student.output_size < self.vocab_size:
            raise ConfigError(f"`student` {self.cfg.student!r} has {self.student.output_size} outputs but the teachers "
                              f"{list(self.cfg.teachers)} have a vocabulary of {self.vocab_size}; use a student with "
                              f"the teachers' tokenizer / classes")
        if self.metas[0].grid == "token" and self.student.task != "causal_lm":
            raise ConfigError(f"`student` is a {self.student.task} but the teachers store per-token targets; use a causal LM")
        if self.metas[0].grid == "sample" and self.student.task == "causal_lm":
            raise ConfigError(f"`student` {self.cfg.student!r} is a causal LM but the teachers {list(self.cfg.teachers)} "
                              f"store one target per sample ({self.vocab_size} classes); use a classifier student")
        if self.metas[0].grid == "sample" and self.student.output_size not in (0, self.vocab_size):
            raise ConfigError(f"`student` {self.cfg.student!r} has {self.student.output_size} classes but the teachers "
                              f"{list(self.cfg.teachers)} have {self.vocab_size}; give the student {self.vocab_size} outputs")
        self.student.module.to(self.device)

    def _hidden_size(self) -> int:
        cfg = getattr(self.student.module, "config", None)
        size = getattr(cfg, "hidden_size", None) or getattr(self.student.module, "hidden_size", None)
        if size is None:
            raise ConfigError(f"`student` {self.cfg.student!r} exposes no hidden_size; gate/feature losses need it")
        return int(size)

    def _setup_objective(self) -> None:
        c = self.cfg
        need_hidden = c.aggregate == "gate" or bool(c.features)
        gate = GateNetwork(self._hidden_size(), len(c.teachers)) if c.aggregate == "gate" else None
        feats, keys = None, {}
        if c.features:
            dims, betas, kinds = [], [], set()
            for t, spec in c.features.items():
                meta = self.metas[list(c.teachers).index(t)]
                f = next(f for f in meta.features if f.layer == int(spec.get("layer", -1)))
                dims.append(f.dim)
                betas.append(float(spec.get("beta", 1.0)))
                kinds.add(spec.get("kind", "mse"))
                keys[t] = f.name
            if len(kinds) > 1:
                raise ConfigError(f"`features`: use one kind (mse or cosine) for all teachers, got {sorted(kinds)}")
            feats = FeatureDistiller(self._hidden_size(), dims, kind=kinds.pop(), betas=betas)
        self.hidden_layer = (int(next(iter(c.features.values())).get("student_layer", -1)) if c.features
                             else -1) if need_hidden else None
        akw = dict(c.aggregate_kwargs)
        if c.aggregate == "routing":
            akw = self._routing_kwargs(akw)
        self.objective = Objective(
            teachers=c.teachers, capture_temperatures=[m.target.temperature for m in self.metas],
            vocab_size=self.vocab_size, aggregate=c.aggregate, aggregate_kwargs=akw, loss=c.loss,
            tail_mode=c.tail_mode, alpha=c.alpha, temperature=c.temperature, gate=gate,
            gate_entropy=c.gate_entropy, features=feats, feature_keys=keys, loss_impl=self._loss_impl()).to(self.device)
        self.model = _Step(self.student, self.objective, self.hidden_layer)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)

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

    def _routing_kwargs(self, akw: dict[str, Any]) -> dict[str, Any]:
        """Accept domain and teacher *names* in the config; the operator takes integer codes."""
        domains = self.reader.inputs.domains or []
        code = {d: i for i, d in enumerate(domains)}
        teacher = {t: i for i, t in enumerate(self.cfg.teachers)}

        def dom(k: Any) -> int:
            if isinstance(k, str) and not k.isdigit():
                if k not in code:
                    raise ConfigError(f"`aggregate_kwargs`: domain {k!r} is not in the cache; its domains are {domains}")
                return code[k]
            return int(k)

        if "domain_to_teacher" in akw:
            akw["domain_to_teacher"] = {dom(k): teacher.get(v, v) if isinstance(v, str) else int(v)
                                        for k, v in akw["domain_to_teacher"].items()}
        if "domain_weights" in akw:
            akw["domain_weights"] = {dom(k): list(v) for k, v in akw["domain_weights"].items()}
        # an unrouted domain would only fail at the first batch that holds it, mid-run
        if not domains:
            raise ConfigError(f"`aggregate` routing needs a cache with domains; {self.cfg.cache} has none "
                              f"(prepare it with a domain column)")
        routed = set(akw.get("domain_to_teacher") or {}) | set(akw.get("domain_weights") or {})
        missing = [d for i, d in enumerate(domains) if i not in routed]
        if missing:
            raise ConfigError(f"`aggregate_kwargs`: the cache's domains {missing} have no route; add them to "
                              f"domain_to_teacher or domain_weights (the cache's domains are {domains})")
        return akw

    def _setup_optimizer(self) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg))

    def _setup_data(self) -> None:
        feats = {t: [int(s.get("layer", -1))] for t, s in self.cfg.features.items()}
        self.dataset = CachedDistillDataset(
            self.reader, teachers=list(self.cfg.teachers), features=feats or None, batch_size=self.cfg.batch_size,
            seed=self.cfg.seed, shuffle=True, shuffle_chunks=self.cfg.shuffle_chunks, rank=self.rank,
            world_size=self.world)

    def _loader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False)

    # -- checkpoints -----------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()),
                "numpy": json.dumps([x.tolist() if hasattr(x, "tolist") else x for x in np.random.get_state()]),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

    def save_checkpoint(self) -> Path | None:
        if self.rank != 0:
            return None
        state = {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "data": self.dataset.state_dict(),
                 "rng": self._rng_state(), "losses": list(self.losses)}
        return save_checkpoint(self.out / "checkpoints", self.step, state, self.cfg)

    def _resume(self) -> None:
        path = latest_checkpoint(self.out / "checkpoints")
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.out / 'checkpoints'}; drop --resume to start")
        state = load_checkpoint(path, self.cfg)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.dataset.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_tuplify(json.loads(rng["python"])))
        np_state = json.loads(rng["numpy"])
        np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])

    # -- training --------------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True

    def _should_stop(self) -> bool:
        """SIGTERM on any rank stops every rank at the same step (one all-reduce per step)."""
        if self.world == 1:
            return self._stop
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop = bool(flag.item() > 0)
        return self._stop

    def train(self) -> list[float]:
        """Run until `max_steps`; return the per-step losses (all of the run, resumed ones included)."""
        c = self.cfg
        prev = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.out.mkdir(parents=True, exist_ok=True)
        log = open(self.out / "metrics.jsonl", "a") if self.rank == 0 else None  # noqa: SIM115 - closed below
        tb = self._tensorboard() if (c.tensorboard and self.rank == 0) else None
        step_model = self.ddp or self.model
        step_model.train()
        it = iter(self._loader())
        bar = tqdm(total=c.max_steps, initial=self.step, desc="train", disable=self.rank != 0 or not c.progress)
        t0, positions = time.perf_counter(), 0
        while self.step < c.max_steps and not self._should_stop():
            terms_sum: dict[str, float] = {}
            for micro in range(c.grad_accum):
                batch = _to_device(next(it), self.device)
                self.dataset.consumed(1)
                sync = nullcontext() if (self.ddp is None or micro == c.grad_accum - 1) else self.ddp.no_sync()
                amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
                with sync, amp:
                    terms = step_model(batch)
                    (terms["loss"] / c.grad_accum).backward()
                positions += int(batch["position_mask"].sum()) if "position_mask" in batch else len(batch["sample_ids"])
                for k, v in terms.items():
                    if v.dim() == 0:
                        terms_sum[k] = terms_sum.get(k, 0.0) + float(v.detach()) / c.grad_accum
            if c.clip_grad > 0:
                terms_sum["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad))
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used; step() moves to the next one
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(terms_sum["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{terms_sum['loss']:.4f}")
            if log is not None and self.step % c.log_every == 0:
                rec = {"step": self.step, "lr": lr, **terms_sum,
                       "positions_per_s": positions / max(time.perf_counter() - t0, 1e-9)}
                if "gate_weights" in terms:
                    rec["gate_weights"] = terms["gate_weights"].tolist()
                if "teacher_weights" in terms:
                    rec["teacher_weights"] = terms["teacher_weights"].tolist()
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if tb is not None:
                    for k, v in terms_sum.items():
                        tb.add_scalar(f"train/{k}", v, self.step)
            if c.checkpoint_every and self.step % c.checkpoint_every == 0:
                self.save_checkpoint()
            if c.eval_every and self.step % c.eval_every == 0 and c.eval_cache and self.rank == 0:
                self._log_eval(log)
        bar.close()
        if self._stop or not c.checkpoint_every or self.step % c.checkpoint_every:
            self.save_checkpoint()  # the run's last step is always resumable
        if log is not None:
            log.close()
        signal.signal(signal.SIGTERM, prev)
        return self.losses

    def _log_eval(self, log: Any) -> dict[str, Any]:
        res = self.evaluate()
        if log is not None:
            log.write(json.dumps({"step": self.step, "eval": res}) + "\n")
            log.flush()
        return res

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError("`tensorboard = true` needs the tensorboard package: pip install tensorboard") from e
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- evaluation and saving -------------------------------------------------------------------
    def evaluate(self, teachers: bool = False) -> dict[str, Any]:
        """Student (and optionally cached teachers) on `eval_cache`."""
        if not self.cfg.eval_cache:
            raise ConfigError("evaluation needs `eval_cache` (--eval-cache): a held-out cache with the same tokenizer")
        reader = open_cache(self.cfg.eval_cache)
        train_tok, eval_tok = self.reader.inputs.tokenizer, reader.inputs.tokenizer
        if (train_tok is None) != (eval_tok is None) or (
                train_tok is not None and eval_tok is not None and train_tok.fingerprint != eval_tok.fingerprint):
            raise ConfigError(f"`eval_cache` {self.cfg.eval_cache} was prepared with another tokenizer (or input kind) "
                              f"than `cache` {self.cfg.cache}; prepare it with the same --tokenizer")
        res: dict[str, Any] = {"student": evaluate_student(
            self.student, reader, batch_size=self.cfg.batch_size, max_samples=self.cfg.eval_max_samples,
            mc_samples=self.cfg.mc_samples, device=self.device, vocab_size=self.vocab_size)}
        if teachers:
            present = [t for t in self.cfg.teachers if t in reader.teacher_names]
            res["teachers"] = evaluate_teachers(reader, present, max_samples=self.cfg.eval_max_samples)
        return res

    def save(self) -> Path | None:
        """Save the final student under `out/student` (loadable with from_pretrained) and the config."""
        if self.rank != 0:
            return None
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        return save_student(self.student, self.out / "student")

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cpu":
        return batch
    return {k: _to_device(v, device) if isinstance(v, dict) else v.to(device, non_blocking=True)
            for k, v in batch.items()}


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x
