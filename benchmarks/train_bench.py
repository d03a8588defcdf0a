"""Training throughput: our step as `accel_pretrain.train` runs it (through Accelerate) against
(a) a bare PyTorch loop of the same model and batch, (b) a plain GPT-2-layout step (LayerNorm,
GELU MLP, learned positions, SDPA, AdamW; nanoGPT's model) with the same width, depth, heads and
FLOPs per token, and (c) the device's dense matmul throughput in the same precision, all measured
in this run. Runs on the GPU when there is one.

    python benchmarks/train_bench.py [--preset small] [--hidden_size H --num_hidden_layers L
        --num_attention_heads A] [--vocab 8192] [--block_size 256] [--micro_batch_size 8]
        [--precision no bf16] [--steps 12] [--repeats 3] [--compile] [--max_batch] [--system_malloc]

Prints medians and the ratios (targets on CPU: Accelerate >= 0.97 of bare; ours >= 1.0 of the
GPT-2 step; fp32 >= 0.75 and bf16 >= 0.50 of matmul). On a GPU it adds MFU against the data-sheet peak, peak memory, and
with --max_batch the largest micro-batch that fits."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time, swiglu_width, timed  # noqa: E402

from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.model import Transformer  # noqa: E402
from accel_pretrain.optim import build_optimizer  # noqa: E402
from accel_pretrain.tracking import peak_flops  # noqa: E402
from accel_pretrain.launch import keep_freed_memory  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synced(fn: Callable[[], object]) -> Callable[[], None]:
    """fn, then wait for the GPU, so wall time is the device's time too."""
    def run() -> None:
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
    return run


def make_data(root: Path, vocab: int) -> Path:
    """Random ids in the prepared-data layout: throughput does not depend on the text."""
    rng = np.random.default_rng(0)
    d = root / "data"
    d.mkdir()
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    train, valid = rng.integers(0, vocab, 4_000_000, dtype=dtype), rng.integers(0, vocab, 100_000, dtype=dtype)
    np.save(d / "train_ids.npy", train)
    np.save(d / "valid_ids.npy", valid)
    (d / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": np.dtype(dtype).name, "eos_token_id": 0,
                                             "train_tokens": len(train), "valid_tokens": len(valid)}))
    return d


def matmul_flops(precision: str, repeats: int = 5) -> float:
    """A square matmul through F.linear, the kernel nn.Linear's forward runs: on CPUs without
    native bf16 it is also the fastest bf16 layout (a plain `a @ b` can be 10x slower there)."""
    n = 8192 if DEVICE.type == "cuda" else 2048
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device=DEVICE) for _ in range(2))
    synced(lambda: F.linear(a, b))()
    return 2 * n ** 3 / median_time(synced(lambda: F.linear(a, b)), repeats)


def bare_step(cfg: ModelConfig, block_size: int, micro_batch: int, precision: str, compile: bool = False,
              model: torch.nn.Module | None = None) -> Callable[[], None]:
    """The same model (or `model`), batch, AdamW and clipping in plain PyTorch: no Accelerate.
    profile_step.py profiles this very step."""
    torch.manual_seed(0)
    model = model if model is not None else Transformer(cfg).to(DEVICE)
    opt = build_optimizer(model, TrainConfig(), fused=DEVICE.type == "cuda")
    forward = torch.compile(model) if compile else model
    x = torch.randint(0, cfg.vocab_size, (micro_batch, block_size + 1), device=DEVICE)
    ctx = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()

    def step() -> None:
        with ctx:
            _, loss = forward(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return synced(step)


class Gpt2(torch.nn.Module):
    """nanoGPT's GPT-2 layout, the baseline our Llama layout must keep up with: pre-LayerNorm blocks,
    fused qkv, GELU MLP of width 4d, learned positions, tied embeddings, SDPA."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, block: int):
        super().__init__()
        nn = torch.nn
        self.heads = heads
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=nn.LayerNorm(d), c_attn=nn.Linear(d, 3 * d), c_proj=nn.Linear(d, d), ln_2=nn.LayerNorm(d),
            c_fc=nn.Linear(d, 4 * d), mlp_proj=nn.Linear(4 * d, d))) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b["c_attn"](b["ln_1"](x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1)
            x = x + b["c_proj"](y)
            x = x + b["mlp_proj"](F.gelu(b["c_fc"](b["ln_2"](x))))
        logits = self.lm_head(self.ln_f(x))
        return None, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def gpt2_step(cfg: ModelConfig, block_size: int, micro_batch: int, precision: str, compile: bool = False
              ) -> Callable[[], None]:
    """The GPT-2-layout step in the same bare loop (same AdamW groups, clipping, batch)."""
    torch.manual_seed(0)
    model = Gpt2(cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, block_size)
    return bare_step(cfg, block_size, micro_batch, precision, compile, model.to(DEVICE))


def bare_pairs(cfg: ModelConfig, args: argparse.Namespace, precision: str, steps: int
               ) -> tuple[list[tuple[float, float]], float]:
    """Our bare loop against the GPT-2 one, one step of each in turn (so that a machine whose speed
    drifts slows both alike): the seconds of each pair, and our loop's peak device memory in GiB (0
    on CPU). The loops are built afresh on every call and freed after it."""
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ours = bare_step(cfg, args.block_size, args.micro_batch_size, precision, args.compile)
    ours()
    ours()  # compile and allocator warm-up
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE.type == "cuda" else 0.0
    gpt2 = gpt2_step(cfg, args.block_size, args.micro_batch_size, precision, args.compile)
    gpt2()
    gpt2()
    return [(timed(ours), timed(gpt2)) for _ in range(steps)], peak


def largest_micro_batch(cfg: ModelConfig, args: argparse.Namespace, precision: str) -> int:
    """Doubles the micro-batch from --micro_batch_size until a step runs out of GPU memory."""
    fits, mb = 0, args.micro_batch_size
    while True:
        try:
            bare_step(cfg, args.block_size, mb, precision, args.compile)()
        except torch.cuda.OutOfMemoryError:
            return fits
        finally:
            torch.cuda.empty_cache()
        fits, mb = mb, mb * 2


def accelerate_tokens_per_s(data: Path, root: Path, args: argparse.Namespace, cfg: ModelConfig, precision: str,
                            i: int | str, extra: tuple[str, ...] = ()) -> float:
    """accel_pretrain.train itself, on cfg's shape (and `extra` flags); the median of its logged
    per-step throughput after step 2."""
    from accelerate.state import AcceleratorState, GradientState

    from accel_pretrain.train import main

    run = root / f"run-{precision}-{i}"
    with contextlib.redirect_stdout(io.StringIO()):  # its per-step progress lines; the log has the figures
        shape = [f"--{k}={getattr(cfg, k)}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "intermediate_size")]
        main(["--data", str(data), "--out", str(run), "--preset", args.preset, *shape, "--block_size", str(args.block_size),
              "--micro_batch_size", str(args.micro_batch_size), "--max_steps", str(args.steps + 2), "--log_interval",
              "1", "--eval_interval", "100000", "--eval_iters", "1", "--save_interval", "100000", "--mixed_precision",
              precision, *extra] + (["--compile"] if args.compile else []))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    lines = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in lines if "loss" in r and 2 < r["step"] <= args.steps + 2)


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The preset, with --hidden_size / --num_hidden_layers / --num_attention_heads overriding it."""
    cfg = dataclasses.replace(ModelConfig(), vocab_size=args.vocab, **PRESETS[args.preset])
    shape = {k: getattr(args, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if getattr(args, k)}
    if shape:
        cfg = dataclasses.replace(cfg, **shape, num_key_value_heads=shape.get("num_attention_heads", cfg.num_attention_heads))
        cfg = dataclasses.replace(cfg, intermediate_size=swiglu_width(cfg.hidden_size))
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--hidden_size", type=int, default=None, help="override the preset's width ...")
    p.add_argument("--num_hidden_layers", type=int, default=None, help="... depth ...")
    p.add_argument("--num_attention_heads", type=int, default=None, help="... and heads (SwiGLU width 8/3 of it)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--precision", nargs="+", default=["no", "bf16"], choices=["no", "bf16"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="torch.compile in both loops")
    p.add_argument("--max_batch", action="store_true", help="GPU: also find the largest micro-batch that fits")
    p.add_argument("--system_malloc", action="store_true",
                   help="CPU: time only the two bare loops (ours, GPT-2), under glibc's default malloc settings "
                        "instead of the ones accel_pretrain.train sets for itself (keep_freed_memory)")
    args = p.parse_args()
    tuned = DEVICE.type == "cpu" and not args.system_malloc and keep_freed_memory()
    cfg = model_config(args)
    fpt = Transformer(cfg).flops_per_token(args.block_size)
    where = machine() if DEVICE.type == "cpu" else torch.cuda.get_device_name()
    print(f"device: {where}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + ("; malloc keeps freed memory in every loop" if tuned else "; default malloc, bare loops only"
             if DEVICE.type == "cpu" else ""))
    print(f"model: {args.preset}, vocab {args.vocab}, block {args.block_size}, micro batch {args.micro_batch_size}, "
          f"{fpt / 1e6:.1f} MFLOP per token{', compiled' if args.compile else ''}; medians of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_data(root, args.vocab)
        for precision in args.precision:
            runs = []
            for i in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
                # Half the bare pairs before the train run and half after: the bare speed that scales
                # the train run is then taken around it, not only minutes before it.
                pairs, mem = bare_pairs(cfg, args, precision, (args.steps + 1) // 2)
                acc = math.nan if args.system_malloc else accelerate_tokens_per_s(data, root, args, cfg, precision, i)
                pairs += bare_pairs(cfg, args, precision, args.steps // 2)[0]
                tokens = args.micro_batch_size * args.block_size
                ours, gpt2 = (tokens / statistics.median(p[j] for p in pairs) for j in (0, 1))
                runs.append((matmul_flops(precision), ours, gpt2, statistics.median(b / a for a, b in pairs), mem, acc))
            mm, bare, gpt2, bare_gpt2, mem, acc = (statistics.median(r[j] for r in runs) for j in range(6))
            # Ratios are taken within each repeat, then the median: a machine whose speed drifts moves
            # both sides of a same-repeat ratio alike. Ours / GPT-2 through train = (train / bare loop,
            # both ours, same repeat) x (bare ours / GPT-2, alternating steps).
            acc_bare = statistics.median(r[5] / r[1] for r in runs)
            acc_gpt2 = statistics.median(r[5] / r[1] * r[3] for r in runs)
            name = "fp32" if precision == "no" else "bf16"
            print(f"\n[{name}] dense matmul:           {mm / 1e9:8.1f} GFLOP/s")
            print(f"[{name}] bare PyTorch loop:      {bare:8.0f} tokens/s  {bare * fpt / 1e9:8.1f} GFLOP/s")
            print(f"[{name}] GPT-2 layout, bare loop: {gpt2:8.0f} tokens/s")
            if args.system_malloc:
                print(f"[{name}] bare ours / GPT-2:      {bare_gpt2:.3f}  (alternating steps; median over repeats)")
                continue
            print(f"[{name}] accel_pretrain.train:   {acc:8.0f} tokens/s  {acc * fpt / 1e9:8.1f} GFLOP/s")
            print(f"[{name}] accelerate / bare:      {acc_bare:.3f}  (medians of the per-repeat ratios)")
            print(f"[{name}] ours (train) / GPT-2:   {acc_gpt2:.3f}   bare ours / GPT-2: {bare_gpt2:.3f}")
            print(f"[{name}] achieved / matmul:      {acc * fpt / mm:.3f}")
            peak = peak_flops(DEVICE, precision, None)
            if peak:
                print(f"[{name}] MFU (data-sheet peak):  {acc * fpt / peak:.3f}")
            if DEVICE.type == "cuda":
                print(f"[{name}] peak memory, bare loop: {mem:.1f} GiB")
                if args.max_batch:
                    print(f"[{name}] largest micro-batch:    {largest_micro_batch(cfg, args, precision)} "
                          f"at block {args.block_size}")


if __name__ == "__main__":
    main()
