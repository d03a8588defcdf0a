"""Counts, step by step, what makes a training process wait: reads of a tensor's value on the host
(aten._local_scalar_dense, behind .item(), float(), int() and bool() of a tensor: on a GPU each one
waits for every kernel queued so far) and collectives started from Python, on the training's process
group (StopVote's, once per step) or on another, and the backward passes whose
gradients DDP's reducer all-reduced (in C++, seen through a comm hook: one per optimizer step when
accumulate() reaches DDP's no_sync).

    python -m tests.count_syncs OUT.json TRAIN-ARGS...      (alone or under accelerate launch)

The optimizer is built as on a GPU (fused AdamW, whose step counts stay tensors), since on a CPU
torch's AdamW reads its step count with .item() (a host tensor there, and on a GPU unfused too).
Under --compile on a CPU the backend is aot_eager: dynamo's DDP graph splitting and AOT autograd as under
inductor, without inductor's C++ build (which module the compiled forward goes through does not
depend on the backend).
Each rank writes OUT.json.rankN: {"step": [value reads, collectives on the default group, others,
all-reduced backward passes]};
a step counts from its get_batch to the next one, its periodic actions included.
On a GPU the first count is of every call that makes the host wait for the device, as torch's CUDA
sync debug mode reports them (value reads among them), and --compile compiles through inductor."""
from __future__ import annotations

import json
import os
import sys
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils._python_dispatch import TorchDispatchMode

from accel_pretrain import launch, train
from tests.helpers import compile_through

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier", "reduce", "gather")


class ValueReads(TorchDispatchMode):
    def __init__(self, counts: dict[int, list[int]], current: list[int]) -> None:
        super().__init__()
        self.counts, self.current = counts, current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts[self.current[0]][0] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def counting() -> Iterator[dict[int, list[int]]]:
    """{step: [value reads, collectives on the default group, others, all-reduced backward passes]} of
    the train.main calls made inside the block (in this process, or as this rank); step -1 is the setup
    before the first step."""
    counts: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    current, in_hook = [-1], [False]

    def counted(original):  # noqa: ANN001, ANN202
        def collective(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            group = kwargs.get("group")
            if not in_hook[0]:
                counts[current[0]][1 if group is None or group is dist.group.WORLD else 2] += 1
            return original(*args, **kwargs)
        return collective

    def reduced(process_group, bucket):  # noqa: ANN001, ANN202
        counts[current[0]][3] += bucket.is_last()  # the last bucket of a backward pass
        in_hook[0] = True  # the reducer's own all-reduce, made from Python here, is counted as such
        try:
            return allreduce_hook(process_group, bucket)
        finally:
            in_hook[0] = False

    def ddp_init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        ddp_init_original(self, *args, **kwargs)
        self.register_comm_hook(None, reduced)

    saved = {name: getattr(dist, name) for name in COLLECTIVES}
    build_optimizer, get_batch = train.build_optimizer, train.get_batch
    ddp_init_original = DistributedDataParallel.__init__
    DistributedDataParallel.__init__ = ddp_init

    def marked_get_batch(run, step):  # noqa: ANN001, ANN202
        current[0] = step + 1
        return get_batch(run, step)

    def cuda_sync(message, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "synchronizing CUDA operation" in str(message):
            counts[current[0]][0] += 1

    for name, original in saved.items():
        setattr(dist, name, counted(original))
    train.build_optimizer = lambda model, cfg, fused: build_optimizer(model, cfg, fused=True)
    train.get_batch = marked_get_batch
    try:
        if torch.cuda.is_available():  # the driver's own list of waits: value reads and every other sync
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = cuda_sync
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    yield counts
                finally:
                    torch.cuda.set_sync_debug_mode(0)
        else:
            with ValueReads(counts, current):
                yield counts
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
        train.build_optimizer, train.get_batch = build_optimizer, get_batch
        DistributedDataParallel.__init__ = ddp_init_original


def main() -> None:
    out, argv = sys.argv[1], sys.argv[2:]
    if "--compile" in argv and not torch.cuda.is_available():
        compile_through("aot_eager")
    with counting() as counts:
        code = train.main(argv)
    rank = os.environ.get("RANK", "0")
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({str(k): v for k, v in sorted(counts.items())}, f)
    launch.leave(code)


if __name__ == "__main__":
    main()
