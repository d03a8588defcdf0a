"""What the training loop carries from one step to the next (Run), and what one optimizer step
returns (StepResult); train.py runs the loop, periodic.py acts between its steps."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .config import TrainConfig
from .data import TokenData
from .stopping import Deadline, StopVote
from .tracking import RunLog, SpikeWatch, peak_flops


@dataclass
class Run:
    """What the loop carries from one step to the next; what follows from the parts is derived here."""

    cfg: TrainConfig
    data: TokenData
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: dict[str, Any]  # the checkpoint's train state when resuming, else {}
    tokenizer: Any  # the data's, for --eval_tasks (else None)
    deadline: Deadline
    bar: Any = None
    spikes: SpikeWatch = field(default_factory=lambda: SpikeWatch([]))
    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds of eval, save and task scoring since the last logged step
    costs: dict[str, float] = field(default_factory=dict)  # the last measured seconds of each periodic action
    decay_from: int | None = None  # the step a time-limited WSD decay was started at, in this process

    def __post_init__(self) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        self.log = RunLog(Path(cfg.out) / "train_log.jsonl", accelerator.is_main_process)
        self.tokens_per_step = (cfg.micro_batch_size * cfg.block_size * cfg.gradient_accumulation_steps
                                * accelerator.num_processes)
        self.flops_per_token = self.bare_model.flops_per_token(cfg.block_size)
        self.peak_flops = peak_flops(accelerator.device, accelerator.mixed_precision, cfg.peak_flops)  # None: unknown
        self.eos = self.data.meta.get("eos_token_id") if cfg.document_masking else None  # documents end at EOS
        self.vote = StopVote(accelerator.num_processes, accelerator.device)
        self.tokens_seen = self.tokens_last = self.state.get("tokens_seen", 0)
        # The first optimizer step whose gradient norm was not finite, or (fp16) that made the gradient
        # scaler skip SKIP_LIMIT steps in a row (0: none), with its norm; kept on the device and read only
        # where the loop syncs anyway (log, eval, save): no host sync per step on a GPU.
        zero = lambda dtype: torch.zeros((), dtype=dtype, device=accelerator.device)  # noqa: E731
        self.bad_step, self.bad_norm = zero(torch.long), zero(torch.float32)
        self.skipped, self.skip_streak = zero(torch.bool), zero(torch.long)  # fp16: the last step's, in a row

    @property
    def bare_model(self) -> torch.nn.Module:
        """The model without DDP or torch.compile around it (under FSDP2, the sharded module). Accelerate's
        default (keep_torch_compile=True) would point the compiled wrapper at the bare model, leaving DDP
        out of the training forward's path: accumulate()'s no_sync would then find no DDP, and every
        micro-batch would all-reduce."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def start_step(self) -> int:
        return self.state.get("step", 0)

    def elapsed(self) -> float:
        return self.state.get("elapsed_s", 0.0) + time.perf_counter() - self.t_start


class StepResult(NamedTuple):
    loss_sum: torch.Tensor  # summed over the micro-batches, on the device
    grad_norm: torch.Tensor
    lr: float
