"""A real domain specialist: SmolLM2-135M fine-tuned on one domain's training split, resumably.

Full fine-tuning with AdamW on blocks of ``block`` tokens (the domain's training segments joined
with EOS, cut into blocks, shuffled with ``seed``), linear warm-up then cosine decay. The state
(weights, optimizer, step, RNG) is saved every ``save_every`` steps with an atomic rename, so an
interrupted run continues where it stopped; the finished model is saved as a normal
``from_pretrained`` folder under ``models/smollm2-<domain>``.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = ["SpecialistConfig", "train_specialist"]


class SpecialistConfig:
    def __init__(self, domain: str, *, epochs: float = 1.0, block: int = 256, batch: int = 4, lr: float = 5e-5,
                 warmup: int = 10, seed: int = 0, save_every: int = 10) -> None:
        self.domain, self.epochs, self.block, self.batch = domain, epochs, block, batch
        self.lr, self.warmup, self.seed, self.save_every = lr, warmup, seed, save_every

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


def _blocks(tok, data_dir: Path, domain: str, block: int) -> torch.Tensor:
    ids: list[int] = []
    for line in (data_dir / f"{domain}.train.jsonl").read_text(encoding="utf-8").splitlines():
        ids.extend(tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"])
        ids.append(tok.eos_token_id)
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)  # (n_blocks, block)


def _lr(step: int, total: int, cfg: SpecialistConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, total - cfg.warmup)))


def train_specialist(base: Path, data_dir: Path, out: Path, state_dir: Path, cfg: SpecialistConfig) -> Path:
    """Fine-tune the model in `base` on `cfg.domain`; resumes from `state_dir`; returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "mtkd_converted.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    blocks = _blocks(tok, data_dir, cfg.domain, cfg.block)
    order = list(range(len(blocks)))
    random.Random(cfg.seed).shuffle(order)
    total = max(1, int(cfg.epochs * len(blocks) // cfg.batch))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file, step = state_dir / "state.pt", 0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)  # tensors and numbers only: no pickled code
        if state["config"] != cfg.to_dict():
            raise ValueError(f"{state_file} was saved with {state['config']}, not {cfg.to_dict()}; "
                             f"delete {state_dir} to start over with the new settings")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        torch.set_rng_state(state["rng"])
    model.train()
    log_file = state_dir / "log.jsonl"
    if log_file.is_file():  # drop the lines of steps after the saved state: they are done again
        kept = [ln for ln in log_file.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        log_file.write_text("".join(ln + "\n" for ln in kept))
    log = log_file.open("a")
    with tqdm(total=total, initial=step, desc=f"specialist {cfg.domain}", unit="step") as bar:
        while step < total:
            idx = [order[(step * cfg.batch + i) % len(order)] for i in range(cfg.batch)]
            batch = blocks[idx]  # (batch, block)
            for g in opt.param_groups:
                g["lr"] = _lr(step, total, cfg)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log.write(json.dumps({"step": step, "loss": loss.item(), "lr": _lr(step - 1, total, cfg)}) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step % cfg.save_every == 0 or step == total:
                tmp = state_dir / "state.pt.tmp"
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                            "rng": torch.get_rng_state(), "config": cfg.to_dict()}, tmp)
                os.replace(tmp, state_file)
    log.close()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "mtkd_converted.json").write_text(json.dumps({"source": f"{base.name} fine-tuned", **cfg.to_dict(),
                                                         "steps": total, "blocks": len(blocks)}))
    return out
