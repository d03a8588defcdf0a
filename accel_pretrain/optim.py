"""AdamW parameter groups and the learning-rate schedule, counted in optimizer steps."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr over warmup_steps, then
    cosine down to min_lr at max_steps, or (wsd) lr held constant until the last decay_fraction of
    max_steps and a linear or 1-sqrt decay to min_lr. A wsd run resumed with a larger max_steps from
    before its decay simply stays constant longer. Independent of the number of processes."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "wsd":
        decay_start = wsd_decay_start(cfg)
        if step < decay_start or cfg.max_steps <= decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / (cfg.max_steps - decay_start))
        left = 1.0 - progress if cfg.decay_shape == "linear" else 1.0 - math.sqrt(progress)
        return cfg.min_lr + left * (cfg.lr - cfg.min_lr)
    if cfg.max_steps <= cfg.warmup_steps:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def wsd_decay_start(cfg: TrainConfig) -> int:
    """The first step of a WSD run's decay (the lr is constant before it): decay_start where set (a
    time-limited run sets it when its time left comes to decay_fraction), else the last
    decay_fraction of max_steps."""
    if cfg.decay_start is not None:
        return max(cfg.warmup_steps, cfg.decay_start)
    return max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon for the 2-D weight matrices inside the blocks and AdamW for the rest, as one
    optimizer: train.py, Accelerate, the lr scheduler and checkpoints see a single object whose
    param_groups are both optimizers' groups and whose state holds both states (the two own disjoint
    parameters, so one dict serves them)."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's signature)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._shared_muon_step(dist.get_rank(), dist.get_world_size())
        else:
            self.muon.step()
        self.adamw.step()

    def _shared_muon_step(self, rank: int, world: int) -> None:
        """torch.optim.Muon's step, its Newton-Schulz iterations shared out among the processes: under
        DDP every rank holds every matrix's update, and without this each would orthogonalise all of
        them (world-fold the work). The matrices, largest first, go in rounds of `world`, one per rank;
        each rank orthogonalises its own (torch's routine, in bf16, as Muon.step does) and one
        all-gather per round gives every rank the round's results, which it applies as Muon.step
        would: the same update, bit for bit. FSDP2's sharded matrices (DTensors) have their update
        gathered whole for the owner (each rank then applies its rows); momentum stays local/sharded."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor, Replicate
        from torch.optim import _muon  # torch's own routines, looked up at each step

        for group in self.muon.param_groups:
            lr = float(group["lr"])
            params = [p for p in group["params"] if p.grad is not None]
            order = sorted(range(len(params)), key=lambda i: -params[i].numel())  # stable: ties keep their order
            for start in range(0, len(order), world):
                members = order[start:start + world]
                mine = None
                for k, i in enumerate(members):  # one update alive at a time, as in torch's own loop
                    update = self._momentum_update(params[i], group)
                    if isinstance(update, DTensor):  # a collective: every rank takes part for every matrix
                        update = update.to(torch.bfloat16).full_tensor()
                    if k == rank:
                        mine = _muon._zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"],
                                                                 group["eps"])
                size = max(params[i].numel() for i in members)
                sent = torch.zeros(size, dtype=torch.bfloat16, device=params[members[0]].device)
                if mine is not None:
                    sent[:mine.numel()] = mine.reshape(-1)
                parts = [torch.empty_like(sent) for _ in range(world)]
                dist.all_gather(parts, sent)
                for k, i in enumerate(members):
                    p = params[i]
                    whole = parts[k][:p.numel()].view(p.shape)
                    if isinstance(p, DTensor):  # this rank's rows of what every rank now holds
                        mesh = p.device_mesh
                        whole = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False
                                                   ).redistribute(mesh, p.placements)
                    p.mul_(1 - lr * group["weight_decay"])
                    p.add_(whole, alpha=-_muon._adjust_lr(lr, group["adjust_lr_fn"], p.shape))

    def _momentum_update(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """torch.optim.Muon's momentum step for one matrix and the update it orthogonalises."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()  # loading replaces the group dicts and the state dict


def build_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings only (norms and biases are not decayed);
    or, with --optimizer muon, Muon for the matrices inside the blocks and that AdamW for the rest.

    Muon's step is scaled to the RMS of an AdamW step (torch's adjust_lr_fn="match_rms_adamw":
    0.2 * sqrt(max(rows, cols)), Moonshot's rule), so both groups take the same --lr and a tuned
    AdamW learning rate carries over without a new sweep."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # the unwrapped model
    hidden = [p for n, p in named if cfg.optimizer == "muon" and p.ndim == 2 and n.startswith("layers.")]
    rest = [p for p in (p for _, p in named) if all(p is not h for h in hidden)]
    groups = [
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    if cfg.optimizer != "muon":
        return adamw
    muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw)


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
