"""The FSDP2 training step at 8 to 32 GPUs, simulated in one process without them
(accel_pretrain.fsdp_sim: torch's fake process group and fake tensors run our model, FSDP2's own
fully_shard and AdamW): per rank, the second step's peak memory and the bytes sent and received in
FSDP's collectives per optimizer step. The memory preflight counts FSDP launches the same way.

    python benchmarks/scale_sim.py [--models 1b llama3-8b] [--worlds 8 32] [--micro_batch_size 1]
        [--block_size 2048] [--accumulation 1 4] [--checkpointing off on]

Each configuration runs in a process of its own (the fake group is the process's default group)."""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.fsdp_sim import simulate_elsewhere  # noqa: E402

# Llama-3 8B's shape (config.json of meta-llama/Meta-Llama-3-8B); 1b with Llama-3's vocabulary
MODELS = {"1b": dict(PRESETS["1b"], vocab_size=128256),
          "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=14336, rope_theta=500000.0, vocab_size=128256,
                            max_position_embeddings=8192)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--worlds", nargs="+", type=int, default=[8, 32])
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--block_size", type=int, default=2048)
    p.add_argument("--accumulation", nargs="+", type=int, default=[1, 4])
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    args = p.parse_args()
    print(f"FSDP2 (bf16 weights, fp32 reduction, AdamW), micro-batch {args.micro_batch_size} x {args.block_size} "
          f"tokens, simulated on fake ranks (torch {torch.__version__}); per rank:")
    print("| model | GPUs | accumulation | activation checkpointing | peak memory | of it weights, gradients, "
          "AdamW state | sent + received per step |")
    print("|---|---|---|---|---|---|---|")
    for name, world, ga, ckpt in itertools.product(args.models, args.worlds, args.accumulation, args.checkpointing):
        train = TrainConfig(model=ModelConfig(**MODELS[name]), micro_batch_size=args.micro_batch_size,
                            block_size=args.block_size, gradient_accumulation_steps=ga,
                            activation_checkpointing=ckpt == "on")
        train.validate()
        step = simulate_elsewhere(train, "bf16", world)
        print(f"| {name} | {world} | {ga} | {ckpt} | {(step['state'] + step['activations']) / 2 ** 30:.1f} GiB | "
              f"{step['state'] / 2 ** 30:.1f} GiB | {step['traffic'] / 1e9:.1f} GB |", flush=True)


if __name__ == "__main__":
    main()
