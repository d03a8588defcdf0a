"""Our GGUF export run by llama.cpp itself: its perplexity against ours on the same text, computed the
way llama-perplexity computes it (chunks of n_ctx tokens, the second half of each chunk scored).

    python benchmarks/llamacpp_check.py RUN TEXT.txt --llama_perplexity PATH/TO/llama-perplexity [--ctx 256]

llama.cpp builds from the source distribution of llama-cpp-python on PyPI (vendor/llama.cpp):
`cmake -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-perplexity -j` (BENCHMARKS.md)."""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel_pretrain.checkpoint import model_from_checkpoint, resolve_checkpoint, tokenizer_dir_of  # noqa: E402
from accel_pretrain.export import export  # noqa: E402


@torch.no_grad()
def our_perplexity(run: str, text: str, n_ctx: int) -> tuple[float, int]:
    from transformers import AutoTokenizer

    ckpt = resolve_checkpoint(run)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir_of(ckpt)))
    model = model_from_checkpoint(ckpt).eval()
    ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    first, nll, count = n_ctx // 2, 0.0, 0
    for c in range(len(ids) // n_ctx):
        x = torch.tensor(ids[c * n_ctx:(c + 1) * n_ctx])
        logp = torch.log_softmax(model(x[None])[0][0].float()[first:n_ctx - 1], -1)
        target = x[first + 1:]
        nll -= logp[torch.arange(len(target)), target].double().sum().item()
        count += len(target)
    return math.exp(nll / count), len(ids) // n_ctx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("text")
    p.add_argument("--llama_perplexity", required=True)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = export(args.run, str(Path(tmp) / "model.gguf"), dtype=args.dtype, fmt="gguf")
        out = subprocess.run([args.llama_perplexity, "-m", str(gguf), "-f", args.text, "-c", str(args.ctx),
                              "-b", str(args.ctx)], capture_output=True, text=True, check=True)
    theirs = float(re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr).group(1))
    chunks = re.search(r"perplexity over (\d+) chunks", out.stdout + out.stderr).group(1)
    ours, n = our_perplexity(args.run, Path(args.text).read_text(encoding="utf-8"), args.ctx)
    print(f"llama.cpp ({args.dtype} GGUF): PPL {theirs:.4f} over {chunks} chunks")
    print(f"accel_pretrain (fp32):        PPL {ours:.4f} over {n} chunks")
    print(f"ratio: {theirs / ours:.6f}")


if __name__ == "__main__":
    main()
