"""Document masking: the cost of attention that stops at document ends, against plain causal SDPA
measured in the same run, forward and backward. Two ways PyTorch offers: SDPA with a boolean mask
(what model.py uses) and flex_attention with a block mask (compiled).

    python benchmarks/attention_bench.py [--batch 8] [--heads 6] [--seq 256] [--head_dim 64] [--doc_len 60]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, median_time  # noqa: E402

from accel_pretrain.model import document_mask  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--doc_len", type=int, default=60, help="mean document length in tokens")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--flex", action="store_true", help="also time flex_attention (compiles first; GPU only: it has "
                   "no backward on CPU)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    ids = torch.randint(1, 1000, (B, T), device=device)
    ids[torch.rand(B, T, device=device) < 1 / args.doc_len] = 0  # EOS
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, T, D, device=device, dtype=dtype)

    def run(fn) -> None:
        out = fn()
        out.backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()

    causal = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    masked = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(ids, 0))  # noqa: E731
    variants = {"causal SDPA (baseline)": causal, "SDPA + document mask": masked}
    if args.flex and device.type == "cpu":
        print("flex_attention: no backward on CPU in this torch (NotImplementedError), so it cannot train here")
    elif args.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        is_eos = (ids == 0).long()
        doc = torch.cumsum(is_eos, 1) - is_eos
        block = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (doc[b, qi] == doc[b, ki]), B, None, T, T,
                                  device=device.type)
        flex = torch.compile(flex_attention)
        variants["flex_attention + block mask"] = lambda: flex(q, k, v, block_mask=block)
    print(f"machine: {machine()}; torch {torch.__version__}; device {device}; {args.dtype}")
    print(f"shape: batch {B}, heads {H}, seq {T}, head_dim {D}; documents of ~{args.doc_len} tokens; "
          f"forward + backward, median of {args.repeats}")
    times = {}
    for name, fn in variants.items():
        run(fn)  # warm-up (and compile)
        times[name] = median_time(lambda fn=fn: run(fn), args.repeats)
    base = times["causal SDPA (baseline)"]
    for name, t in times.items():
        print(f"  {name:<30} {t * 1e3:8.2f} ms   {base / t:5.2f}x the baseline's speed")


if __name__ == "__main__":
    main()
