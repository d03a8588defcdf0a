"""The FSDP2 training step of a run at any number of GPUs, simulated in one process without them:
torch's fake process group and fake tensors run our model, FSDP2's own fully_shard (one unit per
Block, bf16 weights and fp32 reduction as under fsdp.yaml) and the run's optimizer, and count per
rank the peak memory of the second step (torch.distributed._tools' FSDPMemTracker: weights,
gradients, optimizer state, activations and FSDP's gathered blocks) and the bytes each rank sends
and receives in FSDP's collectives per optimizer step (ring: (world - 1) / world of each
all-gather's output and each reduce-scatter's input).

The memory preflight runs it for FSDP launches, in a process of its own (the fake group must be the
process's default group):

    python -m accel_pretrain.fsdp_sim '{"train": {...TrainConfig...}, "precision": "bf16", "world": 8}'

prints {"state": bytes, "activations": bytes, "traffic": bytes}. Nothing runs a kernel; what it
cannot see: the CUDA caching allocator's fragmentation and NCCL's own buffers."""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import torch

from .config import TrainConfig, model_config_from_dict
from .errors import UserError

STATE = ("Sharded Param", "Sharded Grad", "OptState")  # FSDPMemTracker's names for this rank's share of the state


def simulate(train: TrainConfig, precision: str, world: int) -> dict[str, int]:
    """Two optimizer steps of `train` (its model, micro-batch, accumulation, activation checkpointing
    and optimizer) on rank 0 of `world` fake ranks; the second step's peak and traffic. Every
    micro-batch reduce-scatters, as train does under FSDP2."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from .launch import fsdp_precision
    from .model import Transformer
    from .optim import build_optimizer

    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    traffic = [0]
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    def gathered(output, input, *args, **kwargs):  # noqa: A002, ANN001, ANN002, ANN003, ANN202
        traffic[0] += output.numel() * output.element_size() * (world - 1) // world
        return gather(output, input, *args, **kwargs)

    def scattered(output, input, *args, **kwargs):  # noqa: A002, ANN001, ANN002, ANN003, ANN202
        traffic[0] += input.numel() * input.element_size() * (world - 1) // world
        return scatter(output, input, *args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = gathered, scattered
    try:
        mesh = init_device_mesh("cpu", (world,))
        policy = fsdp_precision(precision) or MixedPrecisionPolicy()  # as train's FSDP plugin sets it
        with FakeTensorMode():
            model = Transformer(train.model)
            model.checkpoint_blocks = train.activation_checkpointing
            for layer in model.layers:
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
            optimizer = build_optimizer(model, train, fused=False)
            ids = torch.randint(0, train.model.vocab_size, (train.micro_batch_size, train.block_size + 1))
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((ids,))
            with tracker:  # its peak is the whole run's: the second step, with the optimizer state, is the larger
                for step in range(2):
                    traffic[0] = 0
                    for _ in range(train.gradient_accumulation_steps):
                        tracker.reset_mod_stats()  # per-module statistics only (it follows one forward at a time)
                        _, loss = model(ids[:, :-1], ids[:, 1:])
                        loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
            peak = {k: sum(v.get(k, 0) for v in tracker.get_tracker_snapshot("peak").values())
                    for k in ("Total", *STATE)}
    finally:
        dist.all_gather_single, dist.reduce_scatter_single = gather, scatter
        dist.destroy_process_group()
    state = sum(peak[k] for k in STATE)
    return {"state": state, "activations": peak["Total"] - state, "traffic": traffic[0]}


def simulate_elsewhere(train: TrainConfig, precision: str, world: int) -> dict[str, int]:
    """simulate() in a process of its own, from a process that already has a process group."""
    spec = json.dumps({"train": train.to_dict(), "precision": precision, "world": world})
    proc = subprocess.run([sys.executable, "-m", "accel_pretrain.fsdp_sim", spec], capture_output=True, text=True)
    if proc.returncode:
        raise UserError(f"the FSDP memory count failed: {(proc.stderr.strip().splitlines() or ['?'])[-1][:300]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    spec: dict[str, Any] = json.loads(argv[0])
    values = dict(spec["train"])
    values["model"] = model_config_from_dict(values["model"])
    train = TrainConfig(**values)
    print(json.dumps(simulate(train, spec["precision"], int(spec["world"]))))


if __name__ == "__main__":
    main(sys.argv[1:])
