"""AdamW parameter groups and the learning-rate schedule, counted in optimizer steps."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr over warmup_steps,
    then cosine down to min_lr at max_steps. Independent of the number of processes."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings only; norms and biases (1-D) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR over lr_at, so save_state/load_state carry the position in the schedule."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)


def apply_config_to_schedule(scheduler, cfg: TrainConfig) -> None:
    """After load_state: the checkpoint restored its own base lr, but a resumed run follows the
    current config (e.g. a lower --lr after a divergence). Same formula as LambdaLR, so an
    unchanged config resumes bit-identically."""
    inner = getattr(scheduler, "scheduler", scheduler)
    inner.base_lrs = [cfg.lr for _ in inner.base_lrs]
    for group, base, fn in zip(inner.optimizer.param_groups, inner.base_lrs, inner.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(inner.last_epoch)
