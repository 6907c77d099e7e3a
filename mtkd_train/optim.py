"""Optimizer, learning-rate schedule and fp16 loss scaler of a run.

The schedule is linear warm-up then cosine decay to `min_lr_ratio * lr` over `total_steps`. It is
a callable object, so `LambdaLR.state_dict()` stores its fields and a resume restores the schedule
that was running: resuming with another `--max-steps` continues the original schedule (past its
end the rate stays at the minimum) instead of jumping to another curve.
"""

from __future__ import annotations

import math

import torch

__all__ = ["WarmupCosine", "build_optimizer", "build_scaler"]


class WarmupCosine:
    """lr multiplier at step s: (s + 1) / warmup during warm-up, then cosine from 1 to `min_ratio`.

    Args:
        warmup_steps: Linear warm-up steps.
        total_steps: Step at which the cosine reaches `min_ratio` (the run's max_steps at start).
        min_ratio: Final multiplier.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: list[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int,
                    max_steps: int, min_lr_ratio: float, device: torch.device
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused: one kernel over all parameters, on CUDA and on the CPU) and its warm-up + cosine `LambdaLR`.

    On the CPU the fused step is ~3.5x cheaper than the default multi-tensor one (a (49,152, 128)
    embedding plus 40 small matrices, one thread: 7 ms against 26 ms). A checkpoint keeps the
    setting it was made with: a resumed run steps as it started.
    """
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                                  fused=device.type in ("cuda", "cpu") or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, max_steps, min_lr_ratio))
    return optimizer, scheduler


def build_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled for fp16 autocast only (bf16 and float32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
