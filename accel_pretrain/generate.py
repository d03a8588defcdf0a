"""CLI: sample text from a run directory, a checkpoint, or an exported / Hugging Face Llama folder.

    python -m accel_pretrain.generate MODEL --prompt TEXT [--max_new_tokens 64] [--temperature 0.8]
        [--top_k 50] [--top_p 0.95] [--seed 0]

Our weights are handed to transformers' LlamaForCausalLM, whose generate() brings the KV cache
and the samplers, so there is one sampling implementation to trust."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .checkpoint import load_any
from .errors import UserError, run_cli
from .hf import to_hf_model


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m accel_pretrain.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint, or Hugging Face Llama folder/name")
    p.add_argument("--prompt", default="", help="text to continue (default: start from EOS)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top_k", type=int, default=50)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("need --max_new_tokens >= 1, --temperature >= 0, 0 < --top_p <= 1 and --top_k >= 0")
    model, tok_path, _ = load_any(args.model)
    if tok_path is None:
        raise UserError(f"no tokenizer found next to {args.model}")
    tok = AutoTokenizer.from_pretrained(tok_path)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hf = to_hf_model(model, eos_token_id=eos).to(device)
    ids = tok(args.prompt, add_special_tokens=False, return_tensors="pt").input_ids if args.prompt else None
    if ids is None or ids.numel() == 0:
        ids = torch.tensor([[eos]])
    if ids.shape[1] + args.max_new_tokens > model.config.max_position_embeddings:
        raise UserError(f"prompt + --max_new_tokens exceeds the model's {model.config.max_position_embeddings} positions")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    t0 = time.perf_counter()
    out = hf.generate(ids.to(device), attention_mask=torch.ones_like(ids, device=device),
                      max_new_tokens=args.max_new_tokens, do_sample=sample,
                      temperature=args.temperature if sample else None, top_k=args.top_k if sample else None,
                      top_p=args.top_p if sample else None, pad_token_id=eos, eos_token_id=eos)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    print(args.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens in {seconds:.2f}s, {len(new) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
