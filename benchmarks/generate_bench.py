"""Decoding speed: `accel_pretrain.generate` (our KV cache) against transformers'
`LlamaForCausalLM.generate` on the same weights, both in this run.

    python benchmarks/generate_bench.py [--preset gpt2-124m] [--vocab 50257] [--prompt_len 16]
        [--new_tokens 64] [--repeats 3]

Sampling with temperature 0.8, top-k 50, top-p 0.95 and a fixed seed, so both write the same
tokens (checked). Prints the median tokens/s of each and the ratio, and the weight bytes read per
second (each new token reads every weight once: decoding is memory-bound on CPU)."""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from accel_pretrain.config import PRESETS, ModelConfig  # noqa: E402
from accel_pretrain.generate import generate  # noqa: E402
from accel_pretrain.hf import to_hf_model  # noqa: E402
from accel_pretrain.model import Transformer  # noqa: E402

SAMPLING = dict(temperature=0.8, top_k=50, top_p=0.95)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(), vocab_size=args.vocab, **PRESETS[args.preset])
    model = Transformer(cfg).to(device).eval()
    hf = to_hf_model(model).to(device)
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len), device=device)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())

    def ours() -> torch.Tensor:
        return generate(model, prompt, args.new_tokens, **SAMPLING)

    def theirs() -> torch.Tensor:
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=True, pad_token_id=0, **SAMPLING)[:, args.prompt_len:]

    def rate(fn) -> tuple[float, torch.Tensor]:
        torch.manual_seed(1)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.shape[1] / (time.perf_counter() - t0), out

    rate(ours), rate(theirs)  # warm-up: allocator, kernels, lazy imports
    a, b = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        (ra, ta), (rb, tb) = rate(ours), rate(theirs)
        assert torch.equal(ta, tb), "our sampler and transformers' disagree"
        a.append(ra)
        b.append(rb)
    ours_med, hf_med = statistics.median(a), statistics.median(b)
    print(f"machine: {machine() if device.type == 'cpu' else torch.cuda.get_device_name()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: {args.preset}, vocab {args.vocab}, {model.num_params() / 1e6:.1f}M params fp32, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, median of {args.repeats}")
    print(f"transformers generate:    {hf_med:6.1f} tokens/s")
    print(f"accel_pretrain.generate:  {ours_med:6.1f} tokens/s  ({ours_med * weight_bytes / 1e9:.1f} GB/s of weights)")
    print(f"ours / transformers:      {ours_med / hf_med:.3f}")


if __name__ == "__main__":
    main()
