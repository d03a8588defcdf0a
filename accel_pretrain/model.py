"""A Llama-style decoder, readable top to bottom: RMSNorm, RoPE, grouped-query attention through
SDPA, SwiGLU. Module names mirror transformers' LlamaForCausalLM (without its `model.` prefix), so
the state-dict adapter in hf.py is a renaming and every checkpoint loads in the Llama ecosystem.

The open families people start from differ by a few flags, all in this file: RoPE scaling (linear,
Llama 3.1's, YaRN), q/k/v biases (Qwen2), QK-norm and a head_dim decoupled from the width (Qwen3)."""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x)), normalised in float32 as Llama does (a bf16 variance loses too much),
    with a hand-made backward: left to autograd, the seven elementwise steps and their gradients
    cost a CPU about 7x LayerNorm's fused kernels. The backward borrows that kernel: with mean 0 and
    rstd = 1 / rms(x), LayerNorm's dx = rstd * (g*w - mean(g*w) - xhat * mean(g*w*xhat)) and
    dweight = sum of g*xhat are RMSNorm's, but for the mean(g*w) term, added back with one
    matrix-vector product. 0.9 ms instead of 1.6 ms per (8, 256, 384) forward and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        inv_rms = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (xf * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x, weight, inv_rms = ctx.saved_tensors
        wide, dim = inv_rms.dtype, x.shape[-1]
        xf, gf, wf = x.to(wide), grad.to(wide), weight.to(wide)
        dx, dweight, _ = torch.ops.aten.native_layer_norm_backward(
            gf, xf, [dim], torch.zeros_like(inv_rms), inv_rms, wf, None, [True, True, False])
        mean_gw = torch.mv(gf.reshape(-1, dim), wf).view_as(inv_rms) / dim
        return dx.add_(inv_rms * mean_gw).to(x.dtype), dweight.to(weight.dtype), None


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_size / 2,) and the factor applied to cos and sin, for plain RoPE and
    the scalings of rope_scaling: `linear`, `llama3` (Llama 3.1+) and `yarn`, computed as
    transformers' modeling_rope_utils computes them (tests compare both)."""
    dim, base = cfg.head_size, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # interpolate low frequencies, keep high ones, scale attention by `attention_factor`
        factor = scaling.get("factor") or cfg.max_position_embeddings / scaling["original_max_position_embeddings"]
        old_len = scaling["original_max_position_embeddings"]

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = scaling.get("attention_factor")
        if attention is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
        if scaling.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, device=device).float() / dim)
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - lo) / ((hi - lo) or 0.001), 0, 1)
        extrapolation = 1 - ramp
        return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation, attention
    return inv_freq, 1.0


def rope_cos_sin(cfg: ModelConfig, seq_len: int, device: torch.device, start: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (seq_len, head_size) for positions start.., computed in float32 each call: no
    buffers to keep in sync across dtype casts, sharding or compile, and the cost is negligible."""
    inv_freq, scale = rope_inv_freq(cfg, device)
    freqs = torch.outer(torch.arange(start, start + seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Each pair (i, i + head/2) of x turned by its angle (tables of rope_cos_sin): transformers'
    `x * cos + rotate_half(x) * sin` in three kernels, without building rotate_half(x)."""
    x1, x2 = x.chunk(2, dim=-1)
    sin = sin[..., :x1.shape[-1]]
    out = x * cos
    o1, o2 = out.chunk(2, dim=-1)
    o1.addcmul_(x2, sin, value=-1)
    o2.addcmul_(x1, sin)
    return out


class Rope(torch.autograd.Function):
    """RoPE as the rotation it is: its gradient is the same rotation by the opposite angles. Half the
    time of autograd's version of `x * cos + rotate_half(x) * sin` on a CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return rotate(grad, cos, -sin), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head) rotated by the tables of rope_cos_sin, cast to x's dtype."""
    return Rope.apply(x, cos.to(x.dtype), sin.to(x.dtype))


def document_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B, T) index of the document each token belongs to (a document ends with its EOS token)."""
    is_eos = (input_ids == eos_token_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


def document_mask(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor | None:
    """Boolean attention mask (B, 1, T, T) for windows that span several documents: causal, and each
    token sees only the earlier tokens of its own document (a document ends with its EOS token).
    None (plain causal attention) when eos_token_id is None, i.e. document masking is off.
    Positions are not restarted at document starts: RoPE scores depend only on the distance between
    two tokens, so within a document the attention is exactly that of the document on its own."""
    if eos_token_id is None:
        return None
    doc = document_ids(input_ids, eos_token_id)
    T = input_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def document_block_mask(input_ids: torch.Tensor, eos_token_id: int) -> BlockMask:
    """document_mask as flex_attention's BlockMask: which 128 x 128 tiles of the scores are empty
    (skipped), full (computed without a mask) or partial (masked inside). No (T, T) tensor is kept
    for the backward, and the fused kernel stays: SDPA turns a boolean mask into a bias, which rules
    out its flash kernel and, in the memory-efficient one, is stored per layer. Built by a compiled
    create_block_mask, once per step, for all layers."""
    doc = document_ids(input_ids, eos_token_id)

    def same_document(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    B, T = input_ids.shape
    return compiled(create_block_mask)(same_document, B, None, T, T, device=input_ids.device)


def attention_mask(input_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor | BlockMask | None:
    """Document masking in the form the device runs best: flex_attention's BlockMask on CUDA, the
    boolean mask for SDPA elsewhere (flex_attention has no backward on a CPU). None: plain causal."""
    if eos_token_id is None:
        return None
    if runs_flex(input_ids.device):
        return document_block_mask(input_ids, eos_token_id)
    return document_mask(input_ids, eos_token_id)


def runs_flex(device: torch.device) -> bool:
    """flex_attention runs document masking on CUDA from Ampere (sm80) on; on a V100 or T4 it fails in
    fp16 and is about 10x slower, so those take SDPA with the boolean mask."""
    return device.type == "cuda" and capability(device) >= (8, 0)


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def repeats_kv(device: torch.device, dtype: torch.dtype, gqa: bool, masked: bool, head_dim: int = 128) -> bool:
    """Whether grouped-query attention must repeat its keys and values before SDPA on this card: in
    torch 2.13 SDPA takes GQA (enable_gqa) only in its flash kernel (CUDA sm80+, fp16/bf16, no mask,
    head_dim <= 256) and its math kernel, which keeps a B x H x T x T tensor per layer (torch's SDPA
    documentation). Elsewhere repeating k and v lets the memory-efficient kernel run instead; it only
    costs memory. On a CPU SDPA's own kernel takes GQA as it is."""
    if device.type != "cuda" or not gqa:
        return False
    flash = (capability(device) >= (8, 0) and dtype in (torch.float16, torch.bfloat16) and not masked
             and head_dim <= 256)
    return not flash


@functools.cache
def compiled(fn: Callable) -> Callable:
    """fn under torch.compile, compiled once per input shape: flex_attention runs as a fused kernel
    only compiled (eagerly it materialises the scores), create_block_mask without the (B, T, T) mask."""
    return torch.compile(fn, dynamic=False)


class SharedCast(torch.autograd.Function):
    """x cast once to the autocast dtype for the n projections that read it (q, k, v; gate, up):
    autocast would cast it once per projection, and each projection keeps its own copy for the
    backward. Here they keep views of one copy: 4 bytes x hidden less per token and block in bf16,
    twice, and two casts fewer. The projections' gradients are summed in x's dtype (a sum in bf16
    changes the losses) and in the order autograd adds those of separate casts, latest first: the
    gradients are bit-identical to autocast's own (tests/test_model.py)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype, n: int) -> tuple[torch.Tensor, ...]:
        ctx.dtype = x.dtype
        low = x.to(dtype)
        return tuple(low.view_as(low) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        parts = [g.to(ctx.dtype) for g in reversed(grads) if g is not None]  # autograd's order: last cast first
        return (sum(parts[1:], parts[0]) if parts else None), None, None


def shared_inputs(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """x for n projections: under autocast, one cast shared by all (SharedCast); else x itself."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype == torch.get_autocast_dtype(device):
        return (x,) * n
    return SharedCast.apply(x, torch.get_autocast_dtype(device), n)


class KVCache:
    """Keys and values of every layer, preallocated for max_len positions, so that decoding a token
    costs one pass over the weights and no reallocation. `pos` is the number of positions filled."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_size)
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.repeat_kv: bool | None = None  # None: as repeats_kv decides for the device (memory.py sets it)
        if cfg.qk_norm:  # per-head RMSNorm of queries and keys, before RoPE (Qwen3)
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        xq, xk, xv = shared_inputs(x, 3)
        q = self.q_proj(xq).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(xk).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(xv).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = attn_mask, attn_mask is None
        if kv is not None:  # decoding: append to the cache and attend to everything written so far
            kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v
            k, v = kv[0][:, :, :pos + T], kv[1][:, :, :pos + T]
            causal = T > 1 and pos == 0
            if T > 1 and pos > 0:  # a chunk after earlier tokens: query i sees keys up to pos + i
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
        gqa = self.n_kv != self.n_heads
        if isinstance(mask, BlockMask):  # q, k in v's dtype (QK-norm gives fp32 under autocast): pytorch#176025
            y = compiled(flex_attention)(q.to(v.dtype), k.to(v.dtype), v, block_mask=mask, enable_gqa=gqa)
        else:
            repeat = self.repeat_kv
            if repeat is None:
                repeat = repeats_kv(x.device, v.dtype, gqa, mask is not None, self.head_dim)
            if repeat:
                k, v = (t.repeat_interleave(self.n_heads // self.n_kv, dim=1) for t in (k, v))
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xg, xu = shared_inputs(x, 2)
        return self.down_proj(F.silu(self.gate_proj(xg)) * self.up_proj(xu))


class Block(nn.Module):
    """Pre-norm residual block. FSDP wraps the model at this class."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0,
                attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, pos, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.checkpoint_blocks = False  # activation checkpointing per Block (train's --activation_checkpointing)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @classmethod
    def to_load(cls, cfg: ModelConfig) -> "Transformer":
        """A model whose weights are loaded next: built on the meta device, so nothing is initialised
        (for a 135M model the initialisation takes longer than loading), then given CPU memory."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device="cpu")
        if cfg.tie_word_embeddings:  # to_empty gives each a tensor of its own
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def reset_parameters(self) -> None:
        """Normal(0, std) everywhere; the two projections that write into the residual stream get
        std / sqrt(2 * layers) so the stream's variance does not grow with depth (GPT-2, nanoGPT)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                attn_mask: torch.Tensor | BlockMask | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (ignore_index -100).
        attn_mask (attention_mask's boolean (B, 1, T, T) or BlockMask) replaces the plain causal mask.
        With targets the logits come back in fp32, the copy the loss is computed on: under mixed
        precision Accelerate converts a model's half outputs to fp32, a second copy of the largest
        tensor of the step (2.4% of a bf16 step on CPU) that nobody reads."""
        logits = self.lm_head(self.hidden_states(input_ids, attn_mask=attn_mask))
        loss = None
        if targets is not None:
            logits = logits.float()
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                      attn_mask: torch.Tensor | BlockMask | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden). With a cache, input_ids continue the sequence
        held in it (positions cache.pos..) and their keys and values are appended."""
        pos = cache.pos if cache is not None else 0
        if cache is not None and pos + input_ids.shape[1] > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {pos + input_ids.shape[1]} needed")
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, input_ids.shape[1], x.device, pos)
        recompute = self.checkpoint_blocks and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(self.layers):
            if recompute:  # keep only each block's input; its insides are recomputed in the backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, pos, attn_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, pos, attn_mask)
        if cache is not None:
            cache.pos += input_ids.shape[1]
        return self.norm(x)

    @torch.inference_mode()
    def next_token_logits(self, input_ids: torch.Tensor, cache: KVCache, head_t: torch.Tensor | None = None
                          ) -> torch.Tensor:
        """Logits (B, vocab) for the token after input_ids, which continue the cached sequence. Only
        the last position goes through the LM head, the largest matmul of a small model. head_t, the
        head's weight transposed and contiguous, is read faster at batch 1 on CPU (see generate)."""
        h = self.hidden_states(input_ids, cache)[:, -1]
        return (h @ head_t if head_t is not None else self.lm_head(h)).float()

    def num_params(self, embedding: bool = True) -> int:
        """Parameter count. With embedding=False the lookup table is left out (unless it is tied to
        the LM head, whose matmul does cost FLOPs): the N of the 6N FLOPs estimate."""
        n = sum(p.numel() for p in self.parameters())
        if not embedding and not self.config.tie_word_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls forward and backward plus 12*L*d*T for
        attention scores and values (PaLM appendix B; nanoGPT's estimate_mfu)."""
        c = self.config
        return 6 * self.num_params(embedding=False) + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_size * seq_len
