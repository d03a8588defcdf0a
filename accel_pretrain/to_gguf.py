"""Our model and its tokenizer as one GGUF file for llama.cpp, Ollama and LM Studio, written with the
`gguf` package (the llama.cpp project's own writer) the way llama.cpp's convert_hf_to_gguf.py writes
the Llama, Qwen2 and Qwen3 architectures (Mistral is written as Llama, as that script does).

The tokenizer must be a byte-level BPE whose pre-tokenizer llama.cpp knows by name: GPT-2's regex
(also what `tokenization.prepare` trains), Llama-3's or Qwen2's. The file declares the one the
tokenizer really uses, so llama.cpp splits text as training did."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .hf import to_hf_state_dict
from .model import Transformer, rope_inv_freq

# Pre-tokenizer regexes llama.cpp implements, by the name GGUF files give them (tokenizer.ggml.pre).
GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRE_TOKENIZERS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
             r"\s+(?!\S)|\s+",
    "gpt-2": GPT2_REGEX,
}
FILE_TYPES = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16"}
TENSOR_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The llama.cpp name of a byte-level BPE's pre-tokenizer, or a UserError saying why there is none."""
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise UserError("GGUF export handles byte-level BPE tokenizers (GPT-2, Llama-3, Qwen2, prepare's own); this "
                        "one is not BPE: export the Hugging Face folder and use llama.cpp's convert_hf_to_gguf.py")
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    splits = [p for p in parts if p.get("type") == "Split"]
    if byte_level and not splits and byte_level[0].get("use_regex", True) and not byte_level[0].get("add_prefix_space"):
        return "gpt-2"
    if byte_level and len(splits) == 1:
        regex = (splits[0].get("pattern") or {}).get("Regex")
        for name, known in PRE_TOKENIZERS.items():
            if regex == known:
                return name
    raise UserError("the tokenizer's pre-tokenizer is not one llama.cpp knows by name (GPT-2, Llama-3 or Qwen2 "
                    "regex + ByteLevel); export the Hugging Face folder and use llama.cpp's convert_hf_to_gguf.py")


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows (two halves per head, rotate_half RoPE) -> llama.cpp's interleaved pairs for the
    `llama` architecture, as convert_hf_to_gguf.py does. Qwen2/Qwen3 use the halves layout as is."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: Transformer, tokenizer_dir: Path, path: Path, dtype: str = "float32", name: str = "") -> Path:
    """One GGUF file: the architecture's metadata, the tokenizer, then the tensors."""
    import gguf

    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[model.config.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    add_metadata(w, model.config, dtype, name or path.stem)
    add_tokenizer(w, model.config, tokenizer_dir)
    add_tensors(w, model, arch, dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def add_metadata(w, cfg, dtype: str, name: str) -> None:  # noqa: ANN001 (gguf is imported lazily)
    """Shape, RoPE (with its scaling) and file type, as llama.cpp's loader reads them."""
    import gguf

    w.add_name(name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        for key, add in (("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(scaling[key])


def add_tokenizer(w, cfg, tokenizer_dir: Path) -> None:  # noqa: ANN001
    """The byte-level strings of the vocabulary, the merges and the special tokens; the pre-tokenizer
    named as llama.cpp knows it."""
    import gguf
    from transformers import AutoTokenizer

    path = tokenizer_dir / "tokenizer.json"
    pre = pre_tokenizer_name(json.loads(path.read_text()) if path.is_file() else {})
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = tok.get_vocab()
    added = tok.get_added_vocab()
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        token = reverse.get(i)
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED if token is None else
                     gguf.TokenType.CONTROL if token in added else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=cfg.vocab_size).add_to_gguf(w, quiet=True)


def add_tensors(w, model: Transformer, arch: str, dtype: str) -> None:  # noqa: ANN001
    """Every weight under its GGUF name: q/k rows permuted for the llama architecture, norms and
    biases in f32, matrices in the file type; llama-3 RoPE scaling as a frequency tensor."""
    import gguf

    cfg = model.config
    arch_id = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}[arch]
    scaling = cfg.rope_scaling or {}
    names = gguf.get_tensor_name_map(arch_id, cfg.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, TENSOR_TYPES[dtype])
    state = to_hf_state_dict(model.state_dict())
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reads the embedding when there is no output tensor
    for key, tensor in state.items():
        t = tensor.detach().float()
        if arch == "llama" and key.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_permute(t, cfg.num_attention_heads)
        elif arch == "llama" and key.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_permute(t, cfg.num_key_value_heads)
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise RuntimeError(f"no GGUF name for {key}")  # a bug, not a user error: every tensor maps
        data = t.numpy()
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms and biases stay f32, as llama.cpp has them
            w.add_tensor(gguf_name, data.astype(np.float32))
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    if scaling.get("rope_type") == "llama3":  # llama.cpp divides each frequency by these factors
        base = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))[0]
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                     (base / rope_inv_freq(cfg)[0]).numpy().astype(np.float32))
