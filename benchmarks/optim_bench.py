"""Muon's cost per token: its optimizer step against AdamW's, and both against the forward and
backward of one micro-batch, timed interleaved in one process on one model.

    python benchmarks/optim_bench.py [--preset small --hidden_size 384 --num_hidden_layers 6
        --num_attention_heads 6] [--block_size 256] [--micro_batch_size 8] [--precision bf16] [--repeats 7]
        [--end_to_end 16 [--steps 3]]

Newton-Schulz runs once per optimizer step, whatever the batch, so Muon's extra time per token
falls as the tokens per optimizer step grow. Prints that share for 1 to 64 accumulated
micro-batches, and the fewest that keep it within 5%. With --end_to_end G it also runs
`accel_pretrain.train` itself with G accumulated micro-batches, AdamW and Muon in turn (--repeats
of each, --steps timed steps per run), and prints the extra time per token a real run pays.
With --worlds 1,2,4 it times Muon + AdamW's step on that many gloo processes holding the same
(replicated, as under DDP) model: each orthogonalises its share of the matrices, and the step's
time per process against one process's is what sharing the Newton-Schulz iterations saves. Each
process computes on one thread, so the work per process compares across world sizes; with more
processes than cores they also share the cores.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timed  # noqa: E402
from train_bench import accelerate_tokens_per_s, make_data, model_config  # noqa: E402

from accel_pretrain.config import ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.model import Transformer  # noqa: E402
from accel_pretrain.optim import build_optimizer  # noqa: E402
from accel_pretrain.launch import keep_freed_memory  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--hidden_size", type=int, default=384)
    p.add_argument("--num_hidden_layers", type=int, default=6)
    p.add_argument("--num_attention_heads", type=int, default=6)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--precision", default="bf16", choices=["no", "bf16"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--end_to_end", type=int, default=0, metavar="G",
                   help="also time whole training runs with G accumulated micro-batches per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run of --end_to_end (after 2 warm-up steps)")
    p.add_argument("--worlds", default="", help="e.g. 1,2,4: time the Muon step on that many gloo processes")
    args = p.parse_args()
    if args.worlds:
        return worlds(args)
    args.compile = False
    keep_freed_memory()  # as accel_pretrain.train does on a CPU
    cfg = model_config(args)
    torch.manual_seed(0)
    model = Transformer(cfg)
    adamw = build_optimizer(model, TrainConfig(), fused=False)
    muon = build_optimizer(model, TrainConfig(optimizer="muon"), fused=False)
    x = torch.randint(0, args.vocab, (args.micro_batch_size, args.block_size + 1))

    def micro() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext():
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()

    micro(), adamw.step(), muon.step()  # warm-up; the optimizers' states exist from here on
    times: dict[str, list[float]] = {"micro": [], "adamw": [], "muon": []}
    for _ in range(args.repeats):  # interleaved: a drifting machine slows all three alike
        model.zero_grad(set_to_none=True)
        times["micro"].append(timed(micro))
        times["adamw"].append(timed(adamw.step))
        times["muon"].append(timed(muon.step))
    t_micro, t_adamw, t_muon = (statistics.median(times[k]) for k in ("micro", "adamw", "muon"))
    tokens = args.micro_batch_size * args.block_size
    print(f"machine: {machine()}; torch {torch.__version__}; "
          f"{'bf16 autocast' if args.precision == 'bf16' else 'fp32'}; AVX-512 BF16: "
          f"{torch.cpu._is_avx512_bf16_supported()}")
    print(f"model: {cfg.num_hidden_layers} x {cfg.hidden_size}, {cfg.num_attention_heads} heads, vocab {args.vocab}; "
          f"micro-batch {args.micro_batch_size} x {args.block_size} = {tokens:,} tokens; medians of {args.repeats}")
    print(f"forward + backward of one micro-batch: {t_micro * 1e3:8.1f} ms")
    print(f"AdamW step:                           {t_adamw * 1e3:8.1f} ms")
    print(f"Muon + AdamW step:                    {t_muon * 1e3:8.1f} ms")
    print(f"{'micro-batches per step':>22} {'tokens per step':>16} {'Muon extra time per token':>26}")
    enough = None
    for ga in (1, 2, 4, 8, 16, 32, 64):
        extra = (t_muon - t_adamw) / (ga * t_micro + t_adamw)
        enough = enough or (ga if extra <= 0.05 else None)
        print(f"{ga:>22} {ga * tokens:>16,} {extra:>25.1%}")
    print(f"within 5% from {enough} accumulated micro-batches ({enough * tokens:,} tokens per step)" if enough
          else "more than 5% even at 64 micro-batches per step")
    if args.end_to_end:
        end_to_end(args, cfg)


def world_step(rank: int, world: int, port: int, args: argparse.Namespace, out: list) -> None:
    """One process of --worlds: the same model and gradients on every rank, Muon + AdamW steps timed."""
    import torch.distributed as dist

    torch.set_num_threads(1)  # the same compute per process at every world size
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = Transformer(model_config(args))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    muon = build_optimizer(model, TrainConfig(optimizer="muon"), fused=False)
    muon.step()  # warm-up: the state exists from here on
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        times.append(timed(muon.step))
    slowest = torch.tensor([statistics.median(times)])
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    if rank == 0:
        out.append(float(slowest))
    dist.destroy_process_group()


def worlds(args: argparse.Namespace) -> None:
    import socket

    import torch.multiprocessing as mp

    args.compile = False
    cfg = model_config(args)
    print(f"machine: {machine()}; torch {torch.__version__}; model {cfg.num_hidden_layers} x {cfg.hidden_size}, "
          f"vocab {args.vocab}; Muon + AdamW step, one thread per process, medians of {args.repeats}, the slowest "
          f"process; {os.cpu_count()} cores")
    base = None
    for world in (int(w) for w in args.worlds.split(",")):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        out = mp.Manager().list()
        mp.spawn(world_step, args=(world, port, args, out), nprocs=world, join=True)
        base = base or out[0]
        print(f"world {world}: {out[0] * 1e3:8.1f} ms per step ({base / out[0]:.2f}x world 1)")


def end_to_end(args: argparse.Namespace, cfg: ModelConfig) -> None:
    """accel_pretrain.train with AdamW and with Muon in turn; extra time per token = the ratio of
    their logged throughputs, taken per repeat, median over repeats."""
    ga = args.end_to_end
    ratios, speeds = [], {"adamw": [], "muon": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root, args.vocab)
        for i in range(args.repeats):
            for name in speeds:
                speeds[name].append(accelerate_tokens_per_s(
                    data, root, args, cfg, args.precision, f"{name}-{i}",
                    ("--gradient_accumulation_steps", str(ga), "--optimizer", name)))
            ratios.append(speeds["adamw"][-1] / speeds["muon"][-1] - 1)
    print(f"accel_pretrain.train, {ga} x {args.micro_batch_size * args.block_size:,} = "
          f"{ga * args.micro_batch_size * args.block_size:,} tokens per step, {args.steps} timed steps, "
          f"{args.repeats} runs each: AdamW {statistics.median(speeds['adamw']):,.0f} tokens/s, Muon "
          f"{statistics.median(speeds['muon']):,.0f} tokens/s; Muon's extra time per token "
          f"{statistics.median(ratios):.1%} (runs: {', '.join(f'{r:.1%}' for r in ratios)})")


if __name__ == "__main__":
    main()
