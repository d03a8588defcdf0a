"""CLI: sample text from a run directory, a checkpoint, or an exported / Hugging Face folder (Llama,
Mistral, Qwen2, Qwen3).

    python -m accel_pretrain.generate MODEL --prompt TEXT [--max_new_tokens 64] [--temperature 0.8]
        [--top_k 50] [--top_p 0.95] [--seed 0]

Decoding runs our model with its preallocated KV cache (model.KVCache). The next token is drawn
with transformers' own temperature and top-p warpers after a top-k cut, which is what its generate()
computes: the same seed gives the same text as `LlamaForCausalLM.generate` on the export."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .checkpoint import load_any
from .errors import UserError, run_cli
from .model import KVCache, Transformer


@torch.inference_mode()  # lighter than no_grad: no version counters on the many small decode ops
def generate(model: Transformer, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 50, top_p: float = 0.95, eos_token_id: int | None = None) -> torch.Tensor:
    """New tokens (B, <= max_new_tokens) after the prompt ids (B, T): the prompt in one pass, then one
    cached step per token; stops early once every row has written eos_token_id (and pads with it)."""
    from transformers.generation import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] if temperature > 0 else [])
    if temperature > 0 and top_p < 1:
        warpers.append(TopPLogitsWarper(top_p))
    model.eval()
    # MKL reads the (vocab, hidden) head at batch 1 at ~13 GB/s but a (hidden, vocab) matrix at
    # ~20 GB/s, and decoding is memory-bound: on CPU a transposed copy of the head (extra memory the
    # size of the head) makes each token ~9% faster.
    head_t = model.lm_head.weight.detach().t().contiguous() if ids.device.type == "cpu" else None
    cache = KVCache(model.config, ids.shape[0], ids.shape[1] + max_new_tokens, ids.device, model.lm_head.weight.dtype)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    seq = ids
    for _ in range(max_new_tokens):
        logits = model.next_token_logits(seq[:, cache.pos:], cache, head_t)
        if temperature > 0:
            if 0 < top_k < logits.shape[-1]:  # top-k first, so top-p sorts k scores, not the vocabulary
                top, idx = logits.topk(top_k, dim=-1)
                logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, warpers(seq, top))
            else:
                logits = warpers(seq, logits)
            nxt = torch.multinomial(logits.softmax(-1), num_samples=1).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        if eos_token_id is not None:
            nxt = torch.where(done, eos_token_id, nxt)
            done |= nxt == eos_token_id
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return seq[:, ids.shape[1]:]


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m accel_pretrain.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint, or Hugging Face folder/name (Llama, Mistral, Qwen2, "
                                  "Qwen3)")
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
    model.to(device)
    ids = tok(args.prompt, add_special_tokens=False, return_tensors="pt").input_ids if args.prompt else None
    if ids is None or ids.numel() == 0:
        ids = torch.tensor([[eos]])
    if ids.shape[1] + args.max_new_tokens > model.config.max_position_embeddings:
        raise UserError(f"prompt + --max_new_tokens exceeds the model's {model.config.max_position_embeddings} positions")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    new = generate(model, ids.to(device), args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos)[0]
    seconds = time.perf_counter() - t0
    print(args.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens in {seconds:.2f}s, {len(new) / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
