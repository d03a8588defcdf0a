"""Document masking on a GPU goes through flex_attention with a BlockMask; on a CPU through SDPA
with a boolean mask (flex_attention has no backward there). What a CPU can prove of the GPU path:
the BlockMask is the boolean mask, tile by tile and element by element, on the block sizes used
(a multiple of 128 and not), the compiled flex_attention forward equals the masked SDPA, both are
compiled once per shape, and the path is chosen by the device. torch.compile runs through aot_eager
here: dynamo and AOT autograd trace the two calls as for the card, where inductor then builds Triton
kernels; the C++ kernels it would build on a CPU (two 60 KB flex templates, ~10 s of gcc each) are not
the card's, and that a kernel equals flex_attention's definition is torch's own test."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import BlockMask, create_mask

from accel_pretrain import model as model_module
from accel_pretrain.config import ModelConfig
from accel_pretrain.model import Transformer, attention_mask, document_block_mask, document_mask

EOS = 1


@pytest.fixture(autouse=True)
def traced_as_for_the_card(monkeypatch):
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kwargs: compile_(fn, **{**kwargs, "backend": "aot_eager"}))


def windows(batch: int, T: int, seed: int) -> torch.Tensor:
    """Windows with documents of every kind: one that starts at 0, two EOS in a row, one across a
    tile border, one that ends at the last position, and a window that is one document."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 60, (batch, T), generator=g)
    ids[0, [0, 127, 128, 129, T // 2]] = EOS
    ids[1, [5, T - 1]] = EOS
    return ids


def tiles(mask: torch.Tensor, size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, q tiles, kv tiles) booleans: tiles with any allowed score, tiles with only allowed ones
    (cells past T, in a last partial tile, count as allowed)."""
    B, _, T, _ = mask.shape
    n = -(-T // size)
    padded = torch.ones(B, n * size, n * size, dtype=torch.bool)
    padded[:, :T, :T] = mask[:, 0]
    blocks = padded.view(B, n, size, n, size).transpose(2, 3)
    real = torch.zeros(B, n * size, n * size, dtype=torch.bool)
    real[:, :T, :T] = mask[:, 0]
    return real.view(B, n, size, n, size).transpose(2, 3).any(-1).any(-1), blocks.all(-1).all(-1)


def full_tiles(bm: BlockMask) -> torch.Tensor:
    B, _, n = bm.full_kv_num_blocks.shape
    dense = torch.zeros(B, n, bm.full_kv_indices.shape[-1], dtype=torch.bool)
    for b in range(B):
        for i in range(n):
            dense[b, i, bm.full_kv_indices[b, 0, i, :bm.full_kv_num_blocks[b, 0, i]]] = True
    return dense


@pytest.mark.parametrize("T", [256, 1000])
def test_block_mask_is_the_boolean_mask(T):
    ids = windows(2, T, seed=T)
    expected = document_mask(ids, EOS)
    calls = counters["frames"]["total"]
    bm = document_block_mask(ids, EOS)
    assert torch.equal(create_mask(bm.mask_mod, 2, 1, T, T, device="cpu"), expected)
    kept, full = tiles(expected)
    assert torch.equal(bm.to_dense()[:, 0].bool(), kept)  # empty tiles are skipped, every other one is computed
    assert not (full_tiles(bm) & ~full).any()  # a tile computed without its mask must allow every score
    assert full_tiles(bm).sum() >= full[:, :T // 128, :T // 128].sum()  # and every whole such tile is one
    assert bm.to_dense()[0, 0].sum() < (-(-T // 128)) * (-(-T // 128) + 1) // 2  # documents skip causal tiles
    document_block_mask(windows(2, T, seed=T + 1), EOS)  # other documents, same shape: no second compilation
    assert counters["frames"]["total"] == calls + 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_flex_forward_equals_masked_sdpa_and_the_path_follows_the_device(monkeypatch, precision):
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, qk_norm=True)
    model = Transformer(cfg).eval()
    ids = windows(2, 256, seed=0) % 64
    assert attention_mask(ids, None) is None
    assert isinstance(attention_mask(ids, EOS), torch.Tensor)  # a CPU: SDPA's boolean mask
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), autocast:  # under bf16 autocast QK-norm hands attention fp32 q and k, v is bf16
        sdpa, _ = model(ids, None, attention_mask(ids, EOS))
        monkeypatch.setattr(model_module, "runs_flex", lambda device: True)  # as on CUDA
        mask = attention_mask(ids, EOS)
        assert isinstance(mask, BlockMask)
        calls = counters["frames"]["total"]
        flex, _ = model(ids, None, mask)
        model(windows(2, 256, seed=1) % 64, None, attention_mask(windows(2, 256, seed=1) % 64, EOS))
    assert counters["frames"]["total"] == calls + 1  # flex_attention compiled once for all layers and steps
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    torch.testing.assert_close(flex, sdpa, rtol=tolerance, atol=tolerance)
    monkeypatch.undo()
    assert not model_module.runs_flex(torch.device("cpu"))


@pytest.mark.parametrize("cap,dtype,gqa,masked,flex,repeat,head_dim", [
    ((9, 0), torch.bfloat16, True, False, True, False, 128),  # H100 bf16: flash takes GQA
    ((8, 0), torch.float16, True, False, True, False, 128),   # A100 fp16: the same
    ((8, 0), torch.float32, True, False, True, True, 128),    # fp32 (single_gpu.yaml): no flash, no GQA in mem-efficient
    ((8, 6), torch.bfloat16, True, True, True, True, 128),    # a boolean mask rules flash out (flex: only if not flex)
    ((7, 5), torch.float16, True, False, False, True, 128),   # T4: no flash, no flex
    ((7, 0), torch.float16, True, True, False, True, 128),    # V100 with document masking: SDPA's mask, repeated k/v
    ((7, 0), torch.float16, False, True, False, False, 128),  # no GQA: nothing to repeat
    ((9, 0), torch.bfloat16, True, False, True, True, 512),   # head_dim 512: beyond flash's 256
    (None, torch.bfloat16, True, False, False, False, 128),   # a CPU: SDPA's own kernel takes GQA
])
def test_the_attention_path_exists_on_the_card(monkeypatch, cap, dtype, gqa, masked, flex, repeat, head_dim):
    """flex_attention for document masking from sm80 on; GQA's keys and values repeated wherever SDPA
    would otherwise fall back to its math kernel (a B x H x T x T tensor per layer)."""
    device = torch.device("cuda" if cap else "cpu")
    monkeypatch.setattr(model_module, "capability", lambda d: cap)
    assert model_module.runs_flex(device) == flex
    assert model_module.repeats_kv(device, dtype, gqa, masked, head_dim) == repeat




def test_repeated_keys_and_values_give_the_same_attention_and_cost_their_memory():
    from accel_pretrain.config import TrainConfig
    from accel_pretrain.memory import step_memory

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2)
    model = Transformer(cfg)
    ids = torch.randint(0, 64, (2, 40))
    outputs = []
    for repeat in (False, True):
        for layer in model.layers:
            layer.self_attn.repeat_kv = repeat
        logits, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        outputs.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    train = TrainConfig(micro_batch_size=4, block_size=64, model=cfg)
    plain, repeated = (step_memory(train, "no", repeat_kv=r).activations for r in (False, True))
    # each layer's backward keeps k and v for 8 heads instead of 2: 2 x 6 heads x (B 4 x T 64 x head_dim 8) floats more
    assert repeated - plain == cfg.num_hidden_layers * 2 * 6 * 4 * 64 * 8 * 4, (plain, repeated)
