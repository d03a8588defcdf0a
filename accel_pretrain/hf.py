"""State-dict and config adapter between our Transformer and transformers' LlamaForCausalLM.

One table serves both directions: export renames ours -> HF, import renames HF -> ours. Anything in
an HF config that our model cannot represent is refused with the list of what differs."""
from __future__ import annotations

import os
from typing import Any

import torch

from .config import ModelConfig
from .errors import UserError
from .model import Transformer

# (our prefix, HF prefix), first match wins. Everything under the decoder lives in HF's `model.`.
KEY_MAP: tuple[tuple[str, str], ...] = (("lm_head.", "lm_head."), ("", "model."))


def _rename(key: str, src: int) -> str:
    for pair in KEY_MAP:
        if key.startswith(pair[src]):
            return pair[1 - src] + key[len(pair[src]):]
    raise KeyError(key)


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_rename(k, 0): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {_rename(k, 1): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    return out


def to_hf_config(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
        attention_bias=False, mlp_bias=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        architectures=["LlamaForCausalLM"],
    )


def _rope(hf: Any) -> tuple[float, str | None]:
    params = getattr(hf, "rope_parameters", None) or {}
    scaling = getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), kind


def from_hf_config(hf: Any) -> ModelConfig:
    """Our config for an HF one, or a UserError naming every feature our model does not have."""
    differs = []
    if getattr(hf, "model_type", None) != "llama":
        differs.append(f"model_type is {getattr(hf, 'model_type', None)!r}, not 'llama'")
    heads = getattr(hf, "num_attention_heads", 1)
    hidden = getattr(hf, "hidden_size", 0)
    if getattr(hf, "attention_bias", False):
        differs.append("attention projections have biases (attention_bias=True)")
    if getattr(hf, "mlp_bias", False):
        differs.append("MLP projections have biases (mlp_bias=True)")
    if getattr(hf, "hidden_act", "silu") != "silu":
        differs.append(f"hidden_act is {hf.hidden_act!r}, not 'silu'")
    head_dim = getattr(hf, "head_dim", None) or hidden // max(heads, 1)
    if head_dim * heads != hidden:
        differs.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    theta, kind = _rope(hf)
    if kind != "default":
        differs.append(f"rope scaling {kind!r} is not supported (only plain RoPE)")
    if getattr(hf, "pretraining_tp", 1) != 1:
        differs.append("pretraining_tp != 1")
    if differs:
        raise UserError("this model does not fit our Llama architecture: " + "; ".join(differs))
    return ModelConfig(
        vocab_size=hf.vocab_size, hidden_size=hidden, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        intermediate_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
        rope_theta=theta, rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=bool(hf.tie_word_embeddings),
        initializer_range=getattr(hf, "initializer_range", 0.02),
    )


def quiet_transformers() -> None:
    """Our CLIs print their own one-line summaries; transformers' per-load progress bars are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def to_hf_model(model: Transformer, bos_token_id: int | None = None, eos_token_id: int | None = None,
                dtype: torch.dtype = torch.float32):
    """A LlamaForCausalLM holding our weights (strict: every tensor must map)."""
    from transformers import LlamaForCausalLM

    quiet_transformers()
    hf = LlamaForCausalLM(to_hf_config(model.config, bos_token_id, eos_token_id)).to(dtype)
    state = {k: v.detach().to(dtype) for k, v in to_hf_state_dict(model.state_dict()).items()}
    hf.load_state_dict(state, strict=True)
    hf.eval()
    return hf


def load_hf_config(name_or_path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError and hub errors all mean "not loadable"
        offline = " (HF_HUB_OFFLINE=1: only local folders and cached names work)" if os.environ.get(
            "HF_HUB_OFFLINE") == "1" else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load Hugging Face model {name_or_path!r}{offline}: {first}") from None


def from_hf_pretrained(name_or_path: str) -> Transformer:
    """Our Transformer with the weights of a Llama-architecture checkpoint (folder or hub name)."""
    from transformers import AutoModelForCausalLM

    cfg = from_hf_config(load_hf_config(name_or_path))
    quiet_transformers()
    hf = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    model = Transformer(cfg)
    state = from_hf_state_dict(hf.state_dict(), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{name_or_path}: weights do not match the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model
