"""Our model against transformers' LlamaForCausalLM: same logits, both conversion directions."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from accel_pretrain.config import PRESETS, ModelConfig
from accel_pretrain.errors import UserError
from accel_pretrain.hf import from_hf_config, from_hf_pretrained, to_hf_model, to_hf_state_dict
from accel_pretrain.model import KVCache, RMSNorm, Transformer

SHAPES = [  # (tie, heads, kv heads, rope_theta, seq_len)
    (True, 4, 2, 10000.0, 7),
    (False, 4, 4, 10000.0, 16),
    (True, 8, 1, 123456.7, 33),
    (False, 2, 1, 500.0, 1),
]


def small_config(tie: bool, heads: int, kv: int, theta: float) -> ModelConfig:
    return ModelConfig(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=120, max_position_embeddings=64,
                       rope_theta=theta, tie_word_embeddings=tie)


@pytest.mark.parametrize("tie, heads, kv, theta, T", SHAPES)
def test_logits_match_llama_after_export(tie, heads, kv, theta, T):
    torch.manual_seed(0)
    ours = Transformer(small_config(tie, heads, kv, theta)).eval()
    hf = to_hf_model(ours)
    x = torch.randint(0, 211, (3, T))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("tie, heads, kv, theta, T", SHAPES)
def test_import_from_llama_checkpoint_and_round_trip(tmp_path, tie, heads, kv, theta, T):
    torch.manual_seed(1)
    hf_cfg = LlamaConfig(vocab_size=211, hidden_size=64, num_hidden_layers=3, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=120, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": theta}, tie_word_embeddings=tie,
                         rms_norm_eps=1e-6)
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits nothing we rely on, but make norms non-trivial too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "llama")
    ours = from_hf_pretrained(str(tmp_path / "llama")).eval()
    x = torch.randint(0, 211, (2, T))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-5
    back = to_hf_state_dict(ours.state_dict())
    original = hf.state_dict()
    assert set(back) == set(original)
    for k, v in original.items():
        assert torch.equal(back[k], v), k
    assert ours.config.tie_word_embeddings == tie and ours.config.rms_norm_eps == 1e-6


@pytest.mark.parametrize("change, expected", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "rope scaling 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_llama_variants_are_named(change, expected):
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=32, **change)
    with pytest.raises(UserError, match="does not fit") as err:
        from_hf_config(cfg)
    assert expected in str(err.value)


def test_non_llama_model_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="model_type is 'gpt2'"):
        from_hf_pretrained(str(tmp_path / "gpt2"))


def test_presets_sizes_and_flops():
    sizes = {}
    for name in ("tiny", "small", "gpt2-124m"):
        vocab = 50257 if name == "gpt2-124m" else 8192
        sizes[name] = Transformer(dataclasses.replace(ModelConfig(), vocab_size=vocab, **PRESETS[name])).num_params()
    assert 0.7e6 < sizes["tiny"] < 1.5e6
    assert 25e6 < sizes["small"] < 35e6
    assert 120e6 < sizes["gpt2-124m"] < 130e6
    m = Transformer(small_config(False, 4, 2, 1e4))
    n = m.num_params() - m.embed_tokens.weight.numel()
    assert m.flops_per_token(32) == 6 * n + 12 * 3 * 64 * 32


@pytest.mark.parametrize("tie, heads, kv, theta, T", SHAPES)
def test_kv_cache_decoding_matches_full_forward(tie, heads, kv, theta, T):
    """Prompt in one pass, then a chunk of 3 at an offset (the masked path), then single tokens:
    every step's next-token logits equal the uncached forward's at that position."""
    torch.manual_seed(0)
    m = Transformer(small_config(tie, heads, kv, theta)).eval()
    x = torch.randint(0, 211, (2, T + 8))
    full = m(x)[0]
    cache = KVCache(m.config, 2, T + 8, x.device, torch.float32)
    pieces = [(0, T), (T, T + 3)] + [(i, i + 1) for i in range(T + 3, T + 8)]
    head_t = m.lm_head.weight.detach().t().contiguous()  # generate's CPU layout, on the single steps
    for a, b in pieces:
        got = m.next_token_logits(x[:, a:b], cache, head_t if b - a == 1 else None)
        assert (got - full[:, b - 1]).abs().max().item() < 1e-5, (a, b)
    assert cache.pos == T + 8
    with pytest.raises(ValueError, match="KV cache holds"):
        m.next_token_logits(x[:, :1], cache)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generate_matches_llama_generate(temperature):
    """Our cached decoding and samplers give token for token what transformers' generate() gives
    for the same weights and seed, greedy and sampled (temperature, top-k and top-p together)."""
    from accel_pretrain.generate import generate

    torch.manual_seed(0)
    m = Transformer(small_config(False, 4, 2, 1e4)).eval()
    hf = to_hf_model(m)
    x = torch.randint(0, 211, (1, 5))
    kw = dict(do_sample=True, temperature=temperature, top_k=20, top_p=0.9) if temperature else dict(do_sample=False)
    torch.manual_seed(3)
    ours = generate(m, x, 24, temperature, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, min_new_tokens=24, pad_token_id=0, **kw)
    assert ours.shape == (1, 24) and torch.equal(ours, ref[:, 5:])
    assert len(set(ours[0].tolist())) > 3  # a random model does not collapse to one token


def test_generate_stops_at_eos_and_pads_finished_rows():
    from accel_pretrain.generate import generate

    torch.manual_seed(0)
    m = Transformer(small_config(True, 4, 2, 1e4)).eval()
    x = torch.randint(0, 211, (2, 4))
    free = generate(m, x, 12, temperature=0)
    eos = int(free[0, 2])  # make row 0 finish at its third token
    out = generate(m, x, 12, temperature=0, eos_token_id=eos)
    assert (out[0, 2:] == eos).all() and torch.equal(out[0, :3], free[0, :3])
    hits = (free[1] == eos).nonzero()
    if len(hits):  # row 1 stops where it first writes eos
        assert torch.equal(out[1, :hits[0] + 1], free[1, :hits[0] + 1]) and (out[1, hits[0]:] == eos).all()
    else:
        assert out.shape[1] == 12 and torch.equal(out[1], free[1])


def test_forward_loss_is_mean_cross_entropy():
    torch.manual_seed(0)
    m = Transformer(small_config(True, 4, 2, 1e4))
    x = torch.randint(0, 211, (2, 9))
    logits, loss = m(x[:, :-1], x[:, 1:])
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 211), x[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref)
    assert 5.0 < loss.item() < 5.7  # about ln(211) at initialisation: the init is not degenerate


@pytest.mark.parametrize("checkpoint_blocks", [False, True], ids=["plain", "checkpointed"])
def test_torch_compile_fullgraph_forward_and_backward(checkpoint_blocks):
    """The model, with and without activation checkpointing, is one graph for dynamo (fullgraph: no
    break), forward and backward equal to eager, through dynamo and AOTAutograd (aot_eager); through
    inductor, as --compile trains, in test_second_day (one CPU compilation costs 20-30 s on 2 cores)."""
    assert_compiles_like_eager(checkpoint_blocks=checkpoint_blocks, backend="aot_eager")


def assert_compiles_like_eager(checkpoint_blocks: bool, backend: str) -> None:
    """fullgraph=True compilation of the `tiny` model (vocabulary 512, 4 x 32): the loss and every
    gradient, then the inference graph evaluate.score runs (no loss), equal to eager."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(ModelConfig(), vocab_size=512, **PRESETS["tiny"])
    eager = Transformer(cfg)
    compiled_model = Transformer(cfg)
    compiled_model.load_state_dict(eager.state_dict())
    eager.checkpoint_blocks = compiled_model.checkpoint_blocks = checkpoint_blocks
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randint(0, 512, (4, 33))
    _, loss_e = eager(x[:, :-1], x[:, 1:])
    _, loss_c = compiled(x[:, :-1], x[:, 1:])
    loss_e.backward()
    loss_c.backward()
    assert torch.allclose(loss_e, loss_c, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x[:, :-1], None, None)[0], eager(x[:, :-1], None, None)[0],
                                   rtol=1e-5, atol=1e-5)


def test_document_mask_makes_each_document_see_only_itself():
    from accel_pretrain.model import document_mask

    torch.manual_seed(0)
    model = Transformer(small_config(True, 4, 2, 10000.0)).eval()
    eos = 5
    a, b = torch.randint(6, 211, (1, 9)), torch.randint(6, 211, (1, 12))
    window = torch.cat([a, torch.tensor([[eos]]), b], dim=1)
    mask = document_mask(window, eos)
    m = mask[0, 0]
    assert mask.shape == (1, 1, 22, 22) and m[9, 8] and m[11, 10] and not m[10, 9] and not m[3, 4]
    with torch.no_grad():
        masked = model(window, attn_mask=mask)[0]
        plain = model(window)[0]
        alone = model(b)[0]
    # RoPE depends on distances only: within its document, b at offset 10 computes what b alone does
    assert (masked[:, 10:] - alone).abs().max().item() < 1e-5
    assert (plain[:, 10:] - alone).abs().max().item() > 1e-3
    assert torch.equal(masked[:, :10], plain[:, :10])


def test_loss_logits_are_the_fp32_copy_under_autocast():
    """Given targets, the logits returned are the fp32 tensor the loss was computed on, so Accelerate's
    output conversion under mixed precision has nothing left to copy; without targets (generation,
    evaluation) they stay in the autocast dtype."""
    torch.manual_seed(0)
    model = Transformer(small_config(True, 4, 2, 10000.0))
    x, y = torch.randint(0, 211, (2, 9)), torch.randint(0, 211, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
        plain, none = model(x)
    assert logits.dtype == torch.float32 and plain.dtype == torch.bfloat16 and none is None
    assert torch.equal(logits, plain.float())
    assert torch.equal(loss, torch.nn.functional.cross_entropy(logits.view(-1, 211), y.view(-1)))


def test_rmsnorm_and_rope_backward_are_the_exact_gradients():
    """RMSNorm and RoPE have hand-written backwards (speed); gradcheck compares them with finite
    differences in float64, for non-contiguous input too (QK-norm runs on transposed heads)."""
    from accel_pretrain.model import RMSNormFunction, Rope, rope_cos_sin

    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8, dtype=torch.double).transpose(1, 2).requires_grad_()
    w = torch.randn(8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), (x, w))
    cos, sin = rope_cos_sin(ModelConfig(hidden_size=16, num_attention_heads=2), 5, torch.device("cpu"))
    assert torch.autograd.gradcheck(lambda a: Rope.apply(a, cos.double(), sin.double()), (x.detach().requires_grad_(),))


def test_rmsnorm_matches_llama_in_bf16():
    """A bf16 input is normalised in float32 and cast back before the weight, as LlamaRMSNorm does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, theirs = RMSNorm(16, 1e-5), LlamaRMSNorm(16, eps=1e-5)
    theirs.weight.data = ours.weight.data = torch.randn(16)
    x = torch.randn(4, 16).bfloat16()
    assert torch.equal(ours(x), theirs(x))


def test_shared_cast_saves_one_copy_and_keeps_every_gradient_bit_for_bit(monkeypatch):
    """Under bf16 autocast q/k/v (and gate/up) read one bf16 copy of their input instead of one each:
    6 x hidden bytes fewer saved per token and block, and the gradients, summed in fp32 as autocast's
    separate casts sum them, are bit-identical (under torch.compile: test_train's activation
    checkpointing test)."""
    from torch.autograd.graph import saved_tensors_hooks

    from accel_pretrain import model as model_module

    torch.manual_seed(0)
    cfg = dataclasses.replace(small_config(False, 4, 2, 10000.0), qk_norm=True)
    model = Transformer(cfg)
    x, y = torch.randint(0, 211, (2, 33)), torch.randint(0, 211, (2, 33))

    def step(module: torch.nn.Module) -> tuple[int, dict[str, torch.Tensor]]:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16), saved_tensors_hooks(pack, lambda t: t):
            _, loss = module(x, y)
        loss.backward()
        return sum(storages.values()), {n: p.grad.clone() for n, p in model.named_parameters()}

    shared_bytes, shared = step(model)
    monkeypatch.setattr(model_module, "shared_inputs", lambda t, n: (t,) * n)  # autocast's cast per projection
    plain_bytes, plain = step(model)
    for name in plain:
        assert torch.equal(shared[name], plain[name]), name
    tokens = x.numel()
    assert plain_bytes - shared_bytes == cfg.num_hidden_layers * tokens * 2 * cfg.hidden_size * 3
