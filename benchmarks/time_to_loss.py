"""Time to target: how many tokens and seconds each training recipe needs to reach the validation loss
that the baseline (AdamW + cosine) ends with, on one corpus and model shape, over several seeds.

    python benchmarks/time_to_loss.py [--preset mini] [--shape 6x384] [--tokens 1e6]
        [--micro_batch_size 16] [--gradient_accumulation_steps 1] [--seeds 1 2] [--variants ...]
        [--baseline adamw-cosine] [--data DIR | --corpus FILE... [--prepare_args "..."]] [--train_args "..."]

Every run is `accel_pretrain.train` itself in a subprocess, with the same token budget, batch and
peak lr (--lr, or VARIANT@LR for one variant: `adamw-cosine@1e-3 adamw-cosine@4e-3` is an lr
sweep); they differ only in the flags of their variant. Each seed's target is the final
validation loss of the baseline run with that seed; "tokens to target" interpolates between
evaluations, and every ratio is against the baseline of the same seed (median and range over seeds).
Data: --data, a folder made by tokenization.prepare (any tokenizer); or --corpus, anything that
tokenization.prepare reads (files, folders, globs, a Hugging Face dataset name), prepared once
(--prepare_args passes it flags such as --tokenizer or --doc_separator; without --tokenizer it
trains an 8,192-token BPE); by default ../shared/corpora/austen.txt as one document per chapter.
--train_args adds flags to every run (they come last, so they override a variant's). Prints a
table and writes the curves of the first seed with accel_pretrain.plot.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, swiglu_width  # noqa: E402

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


def shape_flags(shape: str | None) -> list[str]:
    """--shape LAYERSxWIDTH (e.g. 6x384): that depth and width, 64-wide heads, GPT-2's MLP FLOPs."""
    if not shape:
        return []
    layers, width = map(int, shape.lower().split("x"))
    heads = str(width // 64)
    return ["--num_hidden_layers", str(layers), "--hidden_size", str(width), "--num_attention_heads", heads,
            "--num_key_value_heads", heads, "--intermediate_size", str(swiglu_width(width))]


def variant_spec(spec: str) -> str:
    """argparse type for VARIANT or VARIANT@LR."""
    name, _, lr = spec.partition("@")
    if name not in VARIANTS:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if lr:
        float(lr)
    return spec


def child_env() -> dict[str, str]:
    """The children run in the caller's folder, so that relative paths in --corpus, --prepare_args and
    --train_args mean what they meant there, and import this checkout's packages. The hub settings are
    the caller's: a tokenizer or dataset named in --prepare_args or --corpus may need the network."""
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    return {**os.environ, "PYTHONPATH": path}


def run_logged(cmd: list[str], log: Path, what: str) -> None:
    """cmd with its output in log; a failure ends the benchmark with one line that points there."""
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env()).returncode
    if code:
        sys.exit(f"time_to_loss: {what} failed (exit {code}); its output is in {log}")


def prepare_data(work: Path, args: argparse.Namespace) -> Path:
    """The prepared data every run trains on: --data as given, else --corpus (or the default Austen
    chapters) tokenized once into WORK/data. A --work folder prepared from another source is
    refused, since its finished runs would be reused."""
    if args.data:
        if not (Path(args.data) / "meta.json").is_file():
            sys.exit(f"time_to_loss: {args.data} has no meta.json; make it with python -m tokenization.prepare")
        return Path(args.data)
    data, corpus, chapters = work / "data", list(args.corpus or []), (work / "chapters.jsonl").resolve()
    if not corpus:
        if not CORPUS.is_file():
            sys.exit(f"time_to_loss: no corpus: {CORPUS} is not here; pass --corpus FILE or --data DIR")
        corpus = [str(chapters)]
    named = [str(Path(c).resolve()) if Path(c).exists() else c for c in corpus]  # a path, or a dataset name
    source = {"corpus": named, "prepare_args": args.prepare_args}
    record = work / "data_source.json"
    if (data / "meta.json").exists():
        if record.exists() and json.loads(record.read_text()) == source:
            return data
        sys.exit(f"time_to_loss: {work} holds data and runs of another corpus or preparation; pass another --work")
    if not args.corpus:  # the default: Austen, one document per chapter, written only when it is prepared
        parts = re.split(r"\n(?=CHAPTER [IVXLC]+\n)", CORPUS.read_text(encoding="utf-8"))
        chapters.write_text("".join(json.dumps({"text": c.strip()}) + "\n" for c in parts if c.strip()), encoding="utf-8")
    cmd = [sys.executable, "-m", "tokenization.prepare", *corpus, "--out", str(data), "--overwrite"]
    run_logged(cmd + shlex.split(args.prepare_args), work / "prepare.out", "tokenization.prepare")
    record.write_text(json.dumps(source))
    return data


def run(data: Path, out: Path, args: argparse.Namespace, spec: str, seed: int) -> list[tuple[float, float, float]]:
    """(tokens, seconds, validation loss) at every evaluation of one run; a finished run in --work is reused."""
    variant, _, lr = spec.partition("@")
    steps = int(args.tokens // (args.micro_batch_size * args.block_size * args.gradient_accumulation_steps))
    log_file = out / "train_log.jsonl"
    finished = log_file.exists() and any('"event": "end"' in x for x in log_file.read_text().splitlines())
    cmd = [sys.executable, "-m", "accel_pretrain.train", "--data", str(data), "--out", str(out), "--overwrite",
           "--preset", args.preset, "--block_size", str(args.block_size), "--micro_batch_size",
           str(args.micro_batch_size), "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
           *shape_flags(args.shape), "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 20)),
           "--lr", lr or str(args.lr), "--eval_interval", str(max(1, steps // args.evals)), "--eval_iters",
           str(args.eval_iters), "--save_interval", str(steps), "--log_interval", str(max(1, steps // 50)),
           "--seed", str(seed), "--mixed_precision", args.precision, *VARIANTS[variant], *shlex.split(args.train_args)]
    if not finished:
        run_logged(cmd, out.parent / f"{out.name}.out", f"run {out.name}")
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    per_step = next(r["tokens_per_step"] for r in lines if "tokens_per_step" in r)
    elapsed = {r["step"]: r["elapsed_s"] for r in lines if "elapsed_s" in r}
    return [(r["step"] * per_step, elapsed.get(r["step"], float("nan")), r["val_loss"]) for r in lines if "val_loss" in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="mini")
    p.add_argument("--shape", default=None, help="LAYERSxWIDTH over the preset, e.g. 6x384")
    p.add_argument("--tokens", type=float, default=1e6)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=16)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--evals", type=int, default=12)
    p.add_argument("--eval_iters", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), type=variant_spec, metavar="VARIANT[@LR]",
                   help=f"from {', '.join(VARIANTS)}; @LR overrides --lr for that run")
    p.add_argument("--baseline", default="adamw-cosine", type=variant_spec,
                   help="the run whose final validation loss is each seed's target (one of --variants)")
    p.add_argument("--data", default=None, help="a folder made by tokenization.prepare to train on")
    p.add_argument("--corpus", nargs="+", default=None,
                   help="or a corpus to prepare first (what tokenization.prepare reads)")
    p.add_argument("--prepare_args", default="",
                   help='flags for tokenization.prepare of the corpus, e.g. "--tokenizer DIR"')
    p.add_argument("--train_args", default="",
                   help='more accel_pretrain.train flags for every run, e.g. "--weight_decay 0.05"')
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--plot", default="time_to_loss.png")
    args = p.parse_args()
    if args.baseline not in args.variants:
        p.error(f"--baseline {args.baseline} is not among --variants")
    if args.data and (args.corpus or args.prepare_args):
        p.error("--data is prepared already: give --corpus and --prepare_args without it")
    work = Path(args.work or tempfile.mkdtemp(prefix="ttl-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, args)
    curves = {(v, s): run(data, work / f"{v}-s{s}", args, v, s) for s in args.seeds for v in args.variants}
    base = {s: curves[(args.baseline, s)][-1] for s in args.seeds}  # (tokens, seconds, loss) at its end
    print(f"machine: {machine()}; preset {args.preset}{' ' + args.shape if args.shape else ''}, block "
          f"{args.block_size}, micro-batch {args.micro_batch_size} x {args.gradient_accumulation_steps} accumulated, "
          f"{args.tokens:,.0f} tokens, lr {args.lr}, precision {args.precision}, seeds {args.seeds}"
          + (f", extra flags {args.train_args}" if args.train_args else ""))
    meta = json.loads((data / "meta.json").read_text())
    print(f"data: {data} ({meta['train_tokens']:,} training tokens, vocabulary {meta['vocab_size']:,})")
    print(f"target of each seed: the final validation loss of the baseline ({args.baseline}) with that seed: "
          + ", ".join(f"{base[s][2]:.4f}" for s in args.seeds))
    print(f"{'variant':<22} {'final val loss per seed':<24} {'tokens to target':>17} {'x baseline':>14} "
          f"{'seconds x baseline':>19} {'s per Mtok x baseline':>22}")
    for v in args.variants:
        finals = ", ".join(f"{curves[(v, s)][-1][2]:.4f}" for s in args.seeds)
        hits = {s: crossing(curves[(v, s)], base[s][2]) for s in args.seeds}
        speed = [(curves[(v, s)][-1][1] / curves[(v, s)][-1][0]) / (base[s][1] / base[s][0]) for s in args.seeds]
        reached = [s for s in args.seeds if hits[s]]
        tok = [hits[s][0] / base[s][0] for s in reached]
        sec = [hits[s][1] / base[s][1] for s in reached]

        def spread(xs: list[float]) -> str:
            return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})" if xs else "not reached"

        tok_abs = f"{statistics.median(hits[s][0] for s in reached):,.0f}" if reached else "-"
        missing = f" [{len(args.seeds) - len(reached)} seed(s) not reached]" if len(reached) < len(args.seeds) else ""
        print(f"{v:<22} {finals:<24} {tok_abs:>17} {spread(tok):>14} {spread(sec):>19} {spread(speed):>22}{missing}")
    run_logged([sys.executable, "-m", "accel_pretrain.plot", *[str(work / f"{v}-s{args.seeds[0]}") for v in args.variants],
                "--out", args.plot], work / "plot.out", "accel_pretrain.plot")
    print(f"curves of seed {args.seeds[0]}: {args.plot}; runs in {work}")


if __name__ == "__main__":
    main()
