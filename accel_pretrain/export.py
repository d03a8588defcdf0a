"""CLI: a checkpoint -> a plain Hugging Face folder of the model's family (config.json,
model.safetensors, generation_config.json, tokenizer) that loads with no custom code: Llama for a
run from scratch, Mistral / Qwen2 / Qwen3 for a run started from one of those.

    python -m accel_pretrain.export SRC OUT [--dtype float32|bfloat16|float16] [--overwrite]
    python -m accel_pretrain.export SRC OUT.gguf --format gguf    # one file for llama.cpp / Ollama

SRC is a run directory (its latest checkpoint) or one checkpoint."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import model_from_checkpoint, resolve_checkpoint, tokenizer_dir_of
from .errors import UserError, run_cli
from .hf import ORIGIN, to_hf_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(src: str, out: str, dtype: str = "float32", overwrite: bool = False, fmt: str = "hf") -> Path:
    from transformers import AutoTokenizer, GenerationConfig

    ckpt = resolve_checkpoint(src)
    out_path = Path(out)
    if fmt == "gguf" and out_path.suffix != ".gguf":
        out_path = out_path.with_name(out_path.name + ".gguf")
    occupied = out_path.is_file() or out_path.is_dir() and any(out_path.iterdir())
    if occupied and not overwrite:
        raise UserError(f"{out_path} already exists and is not empty; pass --overwrite or choose another OUT")
    tok_dir = tokenizer_dir_of(ckpt)
    if tok_dir is None:
        raise UserError(f"no tokenizer found for {ckpt} (expected {ckpt.parent.parent / 'tokenizer'})")
    if fmt == "gguf":
        from .to_gguf import write_gguf

        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.partial-{os.getpid()}")
        try:
            write_gguf(model_from_checkpoint(ckpt), tok_dir, tmp, dtype, name=ckpt.parent.parent.name)
            tmp.replace(out_path)
        finally:
            tmp.unlink(missing_ok=True)
        return out_path
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    model = model_from_checkpoint(ckpt)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    hf = to_hf_model(model, bos_token_id=bos, eos_token_id=eos, dtype=DTYPES[dtype])
    origin = ckpt.parent.parent / ORIGIN  # a run started --init_from a Hugging Face model keeps its settings
    if (origin / "generation_config.json").is_file():
        hf.generation_config = GenerationConfig.from_pretrained(str(origin))
    else:  # no max_new_tokens: it would override the max_length a caller passes (lm-eval's max_gen_toks)
        hf.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, do_sample=True,
                                                temperature=0.8, top_k=50, top_p=0.95)
    if (origin / "config.json").is_file():
        hf.config.pad_token_id = json.loads((origin / "config.json").read_text()).get("pad_token_id")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        if out_path.exists():
            shutil.rmtree(out_path)
        tmp.rename(out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accel_pretrain.export", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="run directory (latest checkpoint) or a checkpoint directory")
    p.add_argument("out", help="output folder for the Hugging Face model")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf",
                   help="hf: a transformers folder (default); gguf: one file for llama.cpp, Ollama, LM Studio")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = export(args.src, args.out, args.dtype, args.overwrite, args.format)
    if args.format == "gguf":
        print(f"exported {resolve_checkpoint(args.src)} -> {out} (GGUF, {args.dtype}); run it with llama.cpp: "
              f"llama-cli -m {out}")
        return 0
    arch = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"exported {resolve_checkpoint(args.src)} -> {out} ({arch}, {args.dtype}); "
          f"load it with AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
