"""Where a training step's time goes: torch.profiler over a few steps of the bare loop that
train_bench.py times, with the operators grouped by the job they do.

    python benchmarks/profile_step.py [--preset small] [--hidden_size H --num_hidden_layers L
        --num_attention_heads A] [--block_size 256] [--micro_batch_size 8] [--precision no|bf16]
        [--steps 3] [--gpt2]

--gpt2 profiles train_bench's GPT-2-layout step of the same shape instead, to compare operator by
operator.

Prints each group's share of the profiled CPU time (or CUDA time on a GPU) and the top operators."""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402
from train_bench import DEVICE, bare_step, gpt2_step, model_config  # noqa: E402

from accel_pretrain.launch import keep_freed_memory  # noqa: E402


GROUPS = [  # first match wins; names are aten operator names
    ("matmul (linear layers, LM head)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")),
    ("attention (SDPA)", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("cross-entropy", ("log_softmax", "nll_loss")),
    ("optimizer (AdamW) and clipping", ("_foreach", "_fused_adam", "addcdiv", "lerp", "norm")),
    ("copies and casts", ("copy_", "_to_copy", "clone", "contiguous")),
]


def group_of(name: str) -> str:
    return next((g for g, keys in GROUPS if any(k in name for k in keys)), "elementwise and other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--hidden_size", type=int, default=None)
    p.add_argument("--num_hidden_layers", type=int, default=None)
    p.add_argument("--num_attention_heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpt2", action="store_true", help="profile the GPT-2-layout baseline step instead")
    args = p.parse_args()
    if DEVICE.type == "cpu":
        keep_freed_memory()  # as accel_pretrain.train does: no page faults in the profile
    cfg = model_config(args)
    step = (gpt2_step if args.gpt2 else bare_step)(cfg, args.block_size, args.micro_batch_size, args.precision)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    attr = "self_device_time_total" if DEVICE.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events) or 1.0
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[group_of(e.key)] += getattr(e, attr)
    print(f"machine: {machine() if DEVICE.type == 'cpu' else torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"model: {'GPT-2 layout, ' if args.gpt2 else ''}{args.preset}, vocab {args.vocab}, block {args.block_size}, micro batch "
          f"{args.micro_batch_size}, {args.precision}; {args.steps} steps profiled, {total / 1e6 / args.steps:.2f} s "
          f"of {'device' if DEVICE.type == 'cuda' else 'CPU'} time per step")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {100 * t / total:5.1f}%  {name}")
    print(events.table(sort_by=attr, row_limit=12))


if __name__ == "__main__":
    main()
