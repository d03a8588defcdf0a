"""What a training step must hold in memory, counted before the first step, so a batch that cannot
fit is refused with one line instead of an allocator traceback or the kernel's OOM killer.

Not a formula: the run's own model, optimizer and step (micro-batches, autocast, document mask,
activation checkpointing) run twice on fake tensors (FakeTensorMode: shapes and dtypes, no storage,
no arithmetic), and every storage an operator creates is counted while it lives. The peak of the
second step (the optimizer state exists then) is what torch's own MemTracker reports for the same
step (tested), at a fraction of its cost."""
from __future__ import annotations

import os
import re
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .config import ModelConfig, TrainConfig
from .errors import UserError
from .model import Transformer, repeats_kv, runs_flex

GIB = 1 << 30
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # a run's mixed_precision -> its compute dtype


@dataclass
class StepMemory:
    """Bytes one process holds at the peak of a training step from the second step on (the
    optimizer state exists then), counted on fake tensors."""

    state: int  # weights, gradients and optimizer state (this process's share of them when sharded)
    activations: int  # the rest of the peak: saved activations, the backward's gradients of them
    micro_batch: int

    @property
    def total(self) -> int:
        return self.state + self.activations

    @property
    def per_window(self) -> float:
        """Activation bytes per window of the micro-batch (they grow linearly in it)."""
        return self.activations / self.micro_batch


class PeakBytes(TorchDispatchMode):
    """Live and peak bytes of the tensor storages that operators create under it, each counted
    until it is freed (torch's MemTracker does this per module, at a cost that grows with the
    model: a minute for the 1b preset; this takes seconds)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self.seen:
            return
        self.seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def step_memory(train: TrainConfig, precision: str, shards: int = 1, bucket_copy: bool = False,
                flex: bool = False, repeat_kv: bool = False) -> StepMemory:
    """The peak of two optimizer steps of `train` (its model, optimizer, micro-batch, accumulation,
    document masking and activation checkpointing) under `precision`, on fake tensors. With
    `shards` > 1 (FSDP) weights, gradients and optimizer state are divided among the
    processes; `bucket_copy` adds DDP's gradient buckets (a second copy of the gradients). `flex`:
    document masking runs in flex_attention (CUDA), which saves what causal attention saves (q, k,
    v, output and log-sum-exp) and keeps no mask per layer, so it is counted as causal attention.
    `repeat_kv`: grouped-query attention repeats k and v for the card's kernel (model.repeats_kv), and
    the repeated copies are what its backward keeps."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .model import document_mask
    from .optim import build_optimizer

    dtype = AUTOCAST_DTYPES.get(precision)
    with FakeTensorMode(), torch.device("cpu"), PeakBytes() as counter:
        model = Transformer(train.model)
        model.checkpoint_blocks = train.activation_checkpointing
        for layer in model.layers:
            layer.self_attn.repeat_kv = repeat_kv
        optimizer = build_optimizer(model, train, fused=False)
        ids = torch.zeros(train.micro_batch_size, train.block_size + 1, dtype=torch.long)
        x, y = ids[:, :-1], ids[:, 1:]
        mask = document_mask(x, 0) if train.document_masking and not flex else None
        for step in range(2):
            if step == 1:
                counter.peak = counter.live  # the second step, with the optimizer state, is the one that counts
            for _ in range(min(train.gradient_accumulation_steps, 2)):
                with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    _, loss = model(x, y, mask)
                loss.backward()
                del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        params = {id(p): p for p in model.parameters()}.values()
        weights = sum(p.numel() * p.element_size() for p in params)
        moments = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
    state = 2 * weights + moments  # weights and their gradients, which live through the backward's peak
    activations = counter.peak - state
    state = (state + (weights if bucket_copy else 0)) // shards
    return StepMemory(state=state, activations=activations, micro_batch=train.micro_batch_size)


def free_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a process of this run may still take, and a phrase naming it ('is free on the NVIDIA
    H100'): the GPU's free memory, or the RAM the kernel reports available (or the cgroup's limit,
    where lower) shared by this node's processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"is free on the {torch.cuda.get_device_name(device)}"
    import psutil

    free = psutil.virtual_memory().available
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":  # the container's working set: its usage less the page cache it can drop
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            used = int((cgroup / "memory.current").read_text()) - int(stat.get("inactive_file", 0))
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return free // local, "of RAM is available" + (f" to each of this machine's {local} processes" if local > 1 else "")


def largest_micro_batch(need: StepMemory, room: int | float) -> int:
    """The largest micro-batch whose step fits in `room` bytes (0: not even one window)."""
    return max(0, int((room - need.state) // need.per_window)) if need.per_window > 0 else 0


def generous_bound(cfg: ModelConfig, micro_batch: int, block_size: int, document_masking: bool) -> int:
    """Bytes that a step cannot exceed by any measure here (several times what step_memory counts:
    4 bytes per parameter for weights, gradients, two moments and a spare copy, 128 fp32 values of
    the width and 32 of the MLP per token and block, 32 bytes per logit (the count gives about 16),
    a float per attention score where a mask is kept): a batch under it skips the count's seconds."""
    tokens = micro_batch * block_size
    params = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2) + cfg.num_hidden_layers * (
        4 * cfg.hidden_size * cfg.num_attention_heads * cfg.head_size + 3 * cfg.hidden_size * cfg.intermediate_size)
    per_block = 4 * (128 * cfg.hidden_size + 32 * cfg.intermediate_size) * tokens
    if document_masking:
        per_block += 4 * micro_batch * cfg.num_attention_heads * block_size ** 2
    return 20 * params + cfg.num_hidden_layers * per_block + 32 * tokens * cfg.vocab_size


# Peak resident memory over the tensors counted by memory.step_memory: glibc's heap and the CPU
# kernels' own buffers (`mini`, fp32, 256 tokens a window: 1.30x at micro-batch 100 and 1.25x at 200
# with an 8k vocabulary, 1.23x at 64 with GPT-2's 50k; peak RSS less the RSS at start).
ALLOCATOR_OVERHEAD = {"cpu": 1.3}


def check_memory(cfg: TrainConfig, model: Transformer, accelerator) -> None:
    """Refuse, before anything is written, a batch whose step cannot fit the device's free memory
    (GPU) or the RAM available (CPU) of any rank, as memory.step_memory counts the step's peak.
    Every rank takes the same decision, so none goes on to write the run directory alone."""
    from accelerate.utils import gather_object

    verdicts = [memory_verdict(cfg, model, accelerator)]
    if accelerator.num_processes > 1:
        verdicts = gather_object(verdicts)
    if refusal := next((v for v in verdicts if v), None):
        raise UserError(refusal)


def memory_verdict(cfg: TrainConfig, model: Transformer, accelerator) -> str | None:
    """This rank's refusal, or None when the step fits."""
    mb, T = cfg.micro_batch_size, cfg.block_size
    device = accelerator.device
    free, where = free_bytes(device)
    # On a CPU the weights already sit in the RAM that free_bytes leaves out.
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) if device.type == "cpu" else 0
    margin = ALLOCATOR_OVERHEAD.get(device.type, 1.0)
    if generous_bound(cfg.model, mb, T, cfg.document_masking) * margin <= free + resident:
        return None
    kind, world, precision = accelerator.distributed_type.name, accelerator.num_processes, accelerator.mixed_precision
    if kind == "FSDP":  # FSDP2's real sharding on fake ranks: gathered blocks and buffers counted too
        from .fsdp_sim import simulate_elsewhere

        counted = simulate_elsewhere(cfg, precision, world)
        need = StepMemory(state=counted["state"], activations=counted["activations"], micro_batch=mb)
    else:  # the attention kernel this card runs decides what its backward keeps
        flex = runs_flex(device)
        repeat = repeats_kv(device, AUTOCAST_DTYPES.get(precision, torch.float32),
                            cfg.model.num_key_value_heads != cfg.model.num_attention_heads,
                            cfg.document_masking and not flex, cfg.model.head_size)
        need = step_memory(cfg, precision, bucket_copy=kind == "MULTI_GPU" and world > 1, flex=flex, repeat_kv=repeat)
    room = (free + resident) / margin  # what the counted tensors may take
    if need.total <= room:
        return None
    return (f"a step of micro-batch {mb} x {T} tokens needs about {need.total * margin / GIB:.1f} GiB "
            f"({need.activations / GIB:.1f} GiB of activations and the backward's tensors, {need.state / GIB:.1f} "
            f"GiB of weights, gradients and optimizer state" + (f", x{margin} for the allocator" if margin > 1 else "")
            + f"), but only {free / GIB:.1f} GiB {where}; "
            + memory_advice(cfg, min(largest_micro_batch(need, room), mb - 1)))


def memory_advice(cfg: TrainConfig, fits: int | None) -> str:
    """What to lower, keeping the tokens per optimizer step."""
    mb, ga = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    if fits == 0:
        return (f"not even one window of {cfg.block_size} tokens fits: lower --block_size, use a smaller model"
                + ("" if cfg.activation_checkpointing else ", or pass --activation_checkpointing"))
    smaller = fits if fits else max(1, mb // 2)
    while mb * ga % smaller:  # a divisor, so the tokens per step stay exactly the same
        smaller -= 1
    text = (f"lower --micro_batch_size to {smaller} and raise --gradient_accumulation_steps to "
            f"{mb * ga // smaller} to keep {mb * ga * cfg.block_size:,} tokens per step and process")
    return text + ("" if cfg.activation_checkpointing else ", or pass --activation_checkpointing")


@contextmanager
def out_of_memory_as_user_error(cfg: TrainConfig) -> Iterator[None]:
    """An allocation that fails (torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError)
    becomes one line with the size it tried and what to lower."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text:
            raise
        tried = re.search(r"(?i)tried to allocate (\d+) bytes", text)
        size = f"{int(tried[1]) / GIB:.2f} GiB" if tried else (re.search(r"(?i)tried to allocate ([\d.]+ \w+)", text)
                                                                 or ["", "memory"])[1]
        line = (f"out of memory: a step of micro-batch {cfg.micro_batch_size} x {cfg.block_size} tokens tried to "
                f"allocate {size} more; " + memory_advice(cfg, None))
        rank = int(os.environ.get("RANK", "0"))
        if rank:  # one rank alone ran out: the CLI prints rank 0's errors only, so this one says it itself
            print(f"error: rank {rank}: {line}", file=sys.stderr, flush=True)
        raise UserError(line) from None
