"""Time to target: how many tokens and seconds each training recipe needs to reach the validation loss
that the baseline (AdamW + cosine) ends with, on one corpus and model shape, over several seeds.

    python benchmarks/time_to_loss.py [--preset mini] [--tokens 1e6] [--seeds 1 2] [--variants ...]

Every run is `accel_pretrain.train` itself in a subprocess, with the same token budget, batch and
peak lr; they differ only in the flags of their variant. The target is the median over seeds of
the baseline's final validation loss; "tokens to target" interpolates between evaluations.
Corpus: ../shared/corpora/austen.txt as one document per chapter, tokenized once with an 8,192-token
trained BPE. Prints a table and writes the curves of the first seed with accel_pretrain.plot.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpora" / "austen.txt"
VARIANTS = {
    "adamw-cosine": [],
    "muon-cosine": ["--optimizer", "muon"],
    "muon-wsd": ["--optimizer", "muon", "--lr_schedule", "wsd", "--decay_fraction", "0.3", "--decay_shape", "1-sqrt"],
    "muon-wsd-docmask": ["--optimizer", "muon", "--lr_schedule", "wsd", "--decay_fraction", "0.3", "--decay_shape",
                         "1-sqrt", "--document_masking"],
    "adamw-docmask": ["--document_masking"],
}


def crossing(points: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(tokens, seconds) where the validation curve first reaches target, interpolated linearly."""
    prev = None
    for tokens, seconds, loss in points:
        if loss <= target:
            if prev is None:
                return tokens, seconds
            t0, s0, l0 = prev
            f = (l0 - target) / (l0 - loss) if l0 != loss else 1.0
            return t0 + f * (tokens - t0), s0 + f * (seconds - s0)
        prev = (tokens, seconds, loss)
    return None


def run(data: Path, out: Path, args: argparse.Namespace, variant: str, seed: int) -> list[tuple[float, float, float]]:
    steps = int(args.tokens // (args.micro_batch_size * args.block_size))
    cmd = [sys.executable, "-m", "accel_pretrain.train", "--data", str(data), "--out", str(out), "--overwrite",
           "--preset", args.preset, "--block_size", str(args.block_size), "--micro_batch_size",
           str(args.micro_batch_size), "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 20)),
           "--lr", str(args.lr), "--eval_interval", str(max(1, steps // args.evals)), "--eval_iters",
           str(args.eval_iters), "--save_interval", str(steps), "--log_interval", str(max(1, steps // 50)),
           "--seed", str(seed), "--mixed_precision", args.precision, *VARIANTS[variant]]
    with open(out.parent / f"{out.name}.out", "w") as log:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    per_step = next(r["tokens_per_step"] for r in lines if "tokens_per_step" in r)
    elapsed = {r["step"]: r["elapsed_s"] for r in lines if "elapsed_s" in r}
    return [(r["step"] * per_step, elapsed.get(r["step"], float("nan")), r["val_loss"]) for r in lines if "val_loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--tokens", type=float, default=1e6)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--evals", type=int, default=12)
    p.add_argument("--eval_iters", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--plot", default="time_to_loss.png")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="ttl-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "meta.json").exists():
        chapters = re.split(r"\n(?=CHAPTER [IVXLC]+\n)", CORPUS.read_text(encoding="utf-8"))
        corpus = work / "chapters.jsonl"
        corpus.write_text("".join(json.dumps({"text": c.strip()}) + "\n" for c in chapters if c.strip()), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "tokenization.prepare", str(corpus), "--out", str(data), "--overwrite"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    curves = {(v, s): run(data, work / f"{v}-s{s}", args, v, s) for s in args.seeds for v in args.variants}
    target = statistics.median(curves[("adamw-cosine", s)][-1][2] for s in args.seeds)
    base_tokens = statistics.median(crossing(curves[("adamw-cosine", s)], target)[0] for s in args.seeds)
    base_seconds = statistics.median(crossing(curves[("adamw-cosine", s)], target)[1] for s in args.seeds)
    print(f"machine: {machine()}; preset {args.preset}, block {args.block_size}, micro-batch {args.micro_batch_size}, "
          f"{args.tokens:,.0f} tokens, lr {args.lr}, precision {args.precision}, seeds {args.seeds}")
    print(f"target: the baseline's final validation loss, median over seeds = {target:.4f} nats")
    print(f"{'variant':<18} {'final val loss (per seed)':<28} {'tokens to target':>17} {'x baseline':>10} "
          f"{'seconds':>8} {'x baseline':>10} {'s / Mtok':>9}")
    for v in args.variants:
        finals = [curves[(v, s)][-1][2] for s in args.seeds]
        hits = [crossing(curves[(v, s)], target) for s in args.seeds]
        speed = statistics.median(curves[(v, s)][-1][1] / curves[(v, s)][-1][0] * 1e6 for s in args.seeds)
        shown = ", ".join(f"{f:.4f}" for f in finals)
        if all(hits):
            tok = statistics.median(h[0] for h in hits)
            sec = statistics.median(h[1] for h in hits)
            print(f"{v:<18} {shown:<28} {tok:>17,.0f} {tok / base_tokens:>10.3f} {sec:>8.1f} {sec / base_seconds:>10.3f} "
                  f"{speed:>9.1f}")
        else:
            print(f"{v:<18} {shown:<28} {'not reached':>17} {'':>10} {'':>8} {'':>10} {speed:>9.1f}")
    subprocess.run([sys.executable, "-m", "accel_pretrain.plot",
                    *[str(work / f"{v}-s{args.seeds[0]}") for v in args.variants], "--out", args.plot],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    print(f"curves of seed {args.seeds[0]}: {args.plot}; runs in {work}")


if __name__ == "__main__":
    main()
