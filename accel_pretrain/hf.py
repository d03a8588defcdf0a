"""State-dict and config adapter between our Transformer and transformers' Llama, Mistral, Qwen2
and Qwen3 models (the same module names in all four), and what an export keeps of the model a run started from.

One table serves both directions: export renames ours -> HF, import renames HF -> ours. Anything in
an HF config that our model cannot represent is refused with the list of what differs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
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


ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings", "attention_factor",
             "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def to_hf_config(cfg: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | None = None):
    """The transformers config of the model's family (Llama unless the run started from another)."""
    from transformers import AutoConfig

    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta} | (cfg.rope_scaling or {})
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_size, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, architectures=[ARCHITECTURES[cfg.model_type]])
    if cfg.model_type == "llama":
        fields.update(attention_bias=False, mlp_bias=False)
    elif cfg.model_type == "mistral":
        fields.update(sliding_window=cfg.sliding_window)
    else:
        fields.update(use_sliding_window=False, sliding_window=cfg.sliding_window)
        if cfg.model_type == "qwen3":
            fields.update(attention_bias=False)
        else:
            del fields["head_dim"]  # Qwen2's config has none: hidden_size / heads
    return AutoConfig.for_model(cfg.model_type, **fields)


def _rope(hf: Any) -> tuple[float, dict[str, Any]]:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    legacy = getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    scaling = {k: v for k, v in {**legacy, **params}.items() if k in ROPE_KEYS and v is not None}
    return float(theta), {"rope_type": kind, **scaling}


def from_hf_config(hf: Any) -> ModelConfig:
    """Our config for an HF one of a supported family, or a UserError naming every feature our
    model does not have."""
    differs = []
    family = getattr(hf, "model_type", None)
    if family not in ARCHITECTURES:
        differs.append(f"model_type is {family!r}, not one of {', '.join(ARCHITECTURES)}")
    heads = getattr(hf, "num_attention_heads", 1)
    hidden = getattr(hf, "hidden_size", 0)
    if getattr(hf, "attention_bias", False):
        differs.append("attention projections have biases (attention_bias=True)")
    if getattr(hf, "mlp_bias", False):
        differs.append("MLP projections have biases (mlp_bias=True)")
    if getattr(hf, "hidden_act", "silu") != "silu":
        differs.append(f"hidden_act is {hf.hidden_act!r}, not 'silu'")
    head_dim = getattr(hf, "head_dim", None) or hidden // max(heads, 1)
    theta, rope = _rope(hf)
    if rope["rope_type"] not in ("default", "linear", "llama3", "yarn"):
        differs.append(f"rope scaling {rope['rope_type']!r} is not supported (plain, linear, llama3 and yarn are)")
    if getattr(hf, "pretraining_tp", 1) != 1:
        differs.append("pretraining_tp != 1")
    window = getattr(hf, "sliding_window", None)
    windowed = getattr(hf, "use_sliding_window", family == "mistral")
    if windowed and window is not None and window < hf.max_position_embeddings:
        differs.append(f"sliding-window attention ({window} < {hf.max_position_embeddings} positions)")
    if differs:
        raise UserError("this model does not fit our architecture: " + "; ".join(differs))
    return ModelConfig(
        vocab_size=hf.vocab_size, hidden_size=hidden, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
        intermediate_size=hf.intermediate_size, max_position_embeddings=hf.max_position_embeddings,
        rope_theta=theta, rms_norm_eps=hf.rms_norm_eps, tie_word_embeddings=bool(hf.tie_word_embeddings),
        initializer_range=getattr(hf, "initializer_range", 0.02),
        head_dim=head_dim if head_dim * heads != hidden else None,
        rope_scaling=rope if rope["rope_type"] != "default" else None,
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3", model_type=family, sliding_window=window,
    )


def quiet_transformers() -> None:
    """Our CLIs print their own one-line summaries; transformers' per-load progress bars are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def to_hf_model(model: Transformer, bos_token_id: int | None = None, eos_token_id: int | None = None,
                dtype: torch.dtype = torch.float32):
    """The transformers model of our family holding our weights (strict: every tensor must map)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    hf = AutoModelForCausalLM.from_config(to_hf_config(model.config, bos_token_id, eos_token_id)).to(dtype)
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
    """Our Transformer with the weights of a Llama, Mistral, Qwen2 or Qwen3 checkpoint (folder or hub name)."""
    from transformers import AutoModelForCausalLM

    cfg = from_hf_config(load_hf_config(name_or_path))
    quiet_transformers()
    hf = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32)
    model = Transformer.to_load(cfg)
    state = from_hf_state_dict(hf.state_dict(), cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{name_or_path}: weights do not match the config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model


ORIGIN = "init_from"  # RUN/init_from/: what export keeps of an --init_from Hugging Face model


def save_origin(source: str, dest: Path) -> None:
    """The --init_from model's config.json (its pad_token_id) and generation_config.json (its decoding
    defaults), kept so that an export of the run carries the original's, not ours; a run of ours
    passes on the one it started from, if any."""
    from .checkpoint import is_ours, resolve_checkpoint

    src = Path(source)
    if is_ours(src):
        before = resolve_checkpoint(src).parent.parent / ORIGIN
        if before.is_dir():
            shutil.copytree(before, dest, dirs_exist_ok=True)
        return
    from transformers import GenerationConfig

    load_hf_config(source).save_pretrained(str(dest))
    try:
        GenerationConfig.from_pretrained(source).save_pretrained(str(dest))
    except OSError:  # the model has no generation_config.json: export writes ours
        pass
