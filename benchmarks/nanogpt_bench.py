"""Our training step against the real nanoGPT run: karpathy/nanoGPT's own `train.py` and `model.py`
(a checkout you give), trained on the same random ids with the same width, depth, heads, block,
batch and FLOPs per token, against `python -m accel_pretrain.train`; both launched as the commands
a user types, alternating, --repeats times. Prints the median tokens/s of each run's logged steps
after the warm-up, and our runs' ratio to nanoGPT's (equal FLOPs per token: the FLOP/s ratio).

    git clone https://github.com/karpathy/nanoGPT
    python benchmarks/nanogpt_bench.py --nanogpt nanoGPT [--n_layer 6 --n_head 6 --n_embd 384]
        [--block_size 256 --batch_size 8 --vocab 8192] [--steps 24] [--repeats 3] [--precision bf16 no]

On a CPU nanoGPT trains in fp32 whatever its --dtype (its train.py uses no autocast there), so its
run is the same in every row; ours runs in each --precision given."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, swiglu_width  # noqa: E402
from train_bench import make_data  # noqa: E402

NANOGPT_FILES = ("train.py", "model.py", "configurator.py")
WARMUP = 4  # logged steps left out of each median


def write_data(root: Path, vocab: int) -> tuple[Path, Path]:
    """train_bench's random ids in our prepared-data layout, and the same ids in nanoGPT's (train.bin,
    val.bin, meta.pkl)."""
    ours, theirs = make_data(root, vocab), root / "nanogpt" / "data" / "bench"
    theirs.mkdir(parents=True)
    np.load(ours / "train_ids.npy").tofile(theirs / "train.bin")
    np.load(ours / "valid_ids.npy").tofile(theirs / "val.bin")
    with open(theirs / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)
    return ours, root / "nanogpt"


def nanogpt_tokens_per_s(work: Path, args: argparse.Namespace) -> float:
    """nanoGPT's train.py as its README runs it on a CPU; tokens/s from its per-iteration times."""
    flags = {"dataset": "bench", "device": "cpu", "compile": False, "n_layer": args.n_layer, "n_head": args.n_head,
             "n_embd": args.n_embd, "block_size": args.block_size, "batch_size": args.batch_size, "bias": False,
             "dropout": 0.0, "gradient_accumulation_steps": 1, "max_iters": args.steps + WARMUP, "lr_decay_iters":
             args.steps + WARMUP, "eval_interval": 10**9, "eval_iters": 1, "log_interval": 1, "wandb_log": False,
             "always_save_checkpoint": False, "out_dir": "out"}
    out = subprocess.run([sys.executable, "train.py", *[f"--{k}={v}" for k, v in flags.items()]], cwd=work,
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"nanoGPT's train.py failed:\n{out.stderr[-2000:]}")
    ms = [float(m.group(2)) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", out.stdout)
          if int(m.group(1)) > WARMUP]
    return args.batch_size * args.block_size / (statistics.median(ms) / 1000)


def ours_tokens_per_s(data: Path, root: Path, args: argparse.Namespace, precision: str, i: int) -> float:
    """python -m accel_pretrain.train on the same shape; the median of its logged tokens/s after the warm-up."""
    run = root / f"run-{precision}-{i}"
    shape = {"hidden_size": args.n_embd, "num_hidden_layers": args.n_layer, "num_attention_heads": args.n_head,
             "num_key_value_heads": args.n_head, "intermediate_size": swiglu_width(args.n_embd)}
    cmd = [sys.executable, "-m", "accel_pretrain.train", "--data", str(data), "--out", str(run), "--preset", "small",
           *[f"--{k}={v}" for k, v in shape.items()], "--block_size", str(args.block_size), "--micro_batch_size",
           str(args.batch_size), "--max_steps", str(args.steps + WARMUP), "--log_interval", "1", "--eval_interval",
           "1000000", "--eval_iters", "1", "--save_interval", "1000000", "--mixed_precision", precision]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if out.returncode:
        sys.exit(f"accel_pretrain.train failed:\n{out.stderr[-2000:]}")
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in lines if "loss" in r and r["step"] > WARMUP)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="a checkout of github.com/karpathy/nanoGPT")
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=24, help="logged steps per run after the warm-up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", nargs="+", default=["bf16", "no"], help="ours: bf16 and/or no (fp32)")
    args = p.parse_args()
    if args.vocab > 65536:
        sys.exit("error: nanoGPT's train.py reads its ids as uint16: --vocab at most 65536")
    missing = [f for f in NANOGPT_FILES if not (args.nanogpt / f).is_file()]
    if missing:
        sys.exit(f"error: {args.nanogpt} is not a nanoGPT checkout (no {', '.join(missing)}): "
                 "git clone https://github.com/karpathy/nanoGPT")
    with tempfile.TemporaryDirectory() as tmp:
        data, work = write_data(Path(tmp), args.vocab)
        for f in NANOGPT_FILES:
            shutil.copy(args.nanogpt / f, work / f)  # its train.py reads configurator.py and data/ from its cwd
        theirs, ours = [], {pr: [] for pr in args.precision}
        for i in range(args.repeats):  # alternating, so that a slow minute of the machine hits both
            theirs.append(nanogpt_tokens_per_s(work, args))
            for pr in args.precision:
                ours[pr].append(ours_tokens_per_s(data, Path(tmp), args, pr, i))
    print(f"machine: {machine()}; {args.n_layer} x {args.n_embd}, {args.n_head} heads, block {args.block_size}, "
          f"batch {args.batch_size}, vocab {args.vocab}; medians of {args.repeats}")
    base = statistics.median(theirs)
    print(f"  nanoGPT train.py (fp32 on a CPU)     {base:9,.0f} tokens/s   runs: {', '.join(f'{t:,.0f}' for t in theirs)}")
    for pr, ts in ours.items():
        ratio = statistics.median(t / b for t, b in zip(ts, theirs))
        print(f"  accel_pretrain.train ({pr:<4})         {statistics.median(ts):9,.0f} tokens/s   "
              f"x{ratio:.3f} of nanoGPT's (median of the per-repeat ratios)   runs: {', '.join(f'{t:,.0f}' for t in ts)}")


if __name__ == "__main__":
    main()
