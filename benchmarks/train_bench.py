"""Training throughput: our step as `accel_pretrain.train` runs it (through Accelerate) against
(a) a bare PyTorch loop of the same model and batch and (b) the machine's dense matmul
throughput in the same precision, all measured in this run.

    python benchmarks/train_bench.py [--preset small] [--block_size 256] [--micro_batch_size 8]
        [--precision no bf16] [--steps 12] [--repeats 3]

Prints medians and the ratios (targets on CPU: Accelerate >= 0.97 of bare; fp32 >= 0.75 and
bf16 >= 0.50 of matmul)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time  # noqa: E402

from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.model import Transformer  # noqa: E402
from accel_pretrain.optim import build_optimizer  # noqa: E402

VOCAB = 8192


def make_data(root: Path) -> Path:
    """Random ids in the prepared-data layout: throughput does not depend on the text."""
    rng = np.random.default_rng(0)
    d = root / "data"
    d.mkdir()
    train, valid = rng.integers(0, VOCAB, 2_000_000, dtype=np.uint16), rng.integers(0, VOCAB, 50_000, dtype=np.uint16)
    np.save(d / "train_ids.npy", train)
    np.save(d / "valid_ids.npy", valid)
    (d / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "dtype": "uint16", "eos_token_id": 0,
                                             "train_tokens": len(train), "valid_tokens": len(valid)}))
    return d


def matmul_flops(precision: str, n: int = 2048, repeats: int = 5) -> float:
    """A square n x n matmul through F.linear, the kernel nn.Linear's forward runs: on CPUs without
    native bf16 it is also the fastest bf16 layout (a plain `a @ b` can be 10x slower there)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    F.linear(a, b)
    return 2 * n ** 3 / median_time(lambda: F.linear(a, b), repeats)


def bare_tokens_per_s(cfg: ModelConfig, args: argparse.Namespace, precision: str) -> float:
    """The same model, batch, AdamW and clipping in plain PyTorch: no Accelerate."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig(), fused=False)
    x = torch.randint(0, VOCAB, (args.micro_batch_size, args.block_size + 1))
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with ctx:
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    per_step = median_time(step, args.steps)
    return args.micro_batch_size * args.block_size / per_step


def accelerate_tokens_per_s(data: Path, root: Path, args: argparse.Namespace, precision: str, i: int) -> float:
    """accel_pretrain.train itself; the median of its logged per-step throughput after step 1."""
    from accelerate.state import AcceleratorState, GradientState

    from accel_pretrain.train import main

    run = root / f"run-{precision}-{i}"
    main(["--data", str(data), "--out", str(run), "--preset", args.preset, "--block_size", str(args.block_size),
          "--micro_batch_size", str(args.micro_batch_size), "--max_steps", str(args.steps + 1), "--log_interval", "1",
          "--eval_interval", "100000", "--eval_iters", "1", "--save_interval", "100000", "--mixed_precision", precision])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in lines if "loss" in r and 1 < r["step"] <= args.steps + 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = dataclasses.replace(ModelConfig(), vocab_size=VOCAB, **PRESETS[args.preset])
    fpt = Transformer(cfg).flops_per_token(args.block_size)
    print(f"machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {args.preset}, vocab {VOCAB}, block {args.block_size}, micro batch {args.micro_batch_size}, "
          f"{fpt / 1e6:.1f} MFLOP per token")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root)
        for precision in args.precision:
            runs = []
            for i in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
                runs.append((matmul_flops(precision), bare_tokens_per_s(cfg, args, precision),
                             accelerate_tokens_per_s(data, root, args, precision, i)))
            mm, bare, acc = (statistics.median(r[j] for r in runs) for j in range(3))
            name = "fp32" if precision == "no" else "bf16"
            print(f"\n[{name}] dense 2048^2 matmul:   {mm / 1e9:8.1f} GFLOP/s")
            print(f"[{name}] bare PyTorch loop:      {bare:8.0f} tokens/s  {bare * fpt / 1e9:6.1f} GFLOP/s")
            print(f"[{name}] accel_pretrain.train:   {acc:8.0f} tokens/s  {acc * fpt / 1e9:6.1f} GFLOP/s")
            print(f"[{name}] accelerate / bare:      {acc / bare:.3f}")
            print(f"[{name}] achieved / matmul:      {acc * fpt / mm:.3f}")


if __name__ == "__main__":
    main()
