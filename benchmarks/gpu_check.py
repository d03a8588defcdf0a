"""What only a GPU can show about the code paths the CPU tests run: which attention kernel CUDA
really runs for each case `model.repeats_kv` decides, flex_attention's document masking against
SDPA's boolean mask (forward and backward), the stop vote's pinned copies and events, and the
memory preflight's count against the allocator's peak of the same two steps.

    python benchmarks/gpu_check.py [--json OUT.json]

Each check prints one line, `ok` or `FAIL` with what it saw; the exit code is the number of
failures. On an H200 (torch 2.11) the kernel, flex and vote checks and the four 124M memory cases
took 100 s."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.memory import GIB, step_memory  # noqa: E402
from accel_pretrain.model import Attention, Transformer, attention_mask, repeats_kv, rope_cos_sin, runs_flex  # noqa: E402
from accel_pretrain.optim import build_optimizer  # noqa: E402
from accel_pretrain.stopping import StopVote  # noqa: E402

DEV = torch.device("cuda", 0)  # an index: init_process_group's device_id needs one


def fast_backends() -> list[SDPBackend]:
    """The kernels SDPA's default dispatch tries before its math kernel, in torch's own priority
    order (torch 2.13: flash, memory-efficient, then math, then cuDNN): a case only these refuse goes
    to math by default, whatever a kernel ranked after math could have done."""
    order = [SDPBackend(i) for i in torch._C._get_sdp_priority_order()]
    return order[:order.index(SDPBackend.MATH)]


FAST = fast_backends()
RESULTS: list[dict] = []


def report(name: str, ok: bool, **seen) -> None:
    RESULTS.append({"check": name, "ok": ok, **seen})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(f"{k}={v}" for k, v in seen.items()), flush=True)


def runs_under(backends: list[SDPBackend], fn) -> bool:
    """Whether fn's attention runs with only these SDPA kernels allowed."""
    try:
        with sdpa_kernel(backends):
            fn()
        torch.cuda.synchronize()
        return True
    except RuntimeError:
        return False


def check_kernels() -> None:
    """Every case repeats_kv decides: our Attention never falls back to SDPA's math kernel, and where
    it repeats k/v, unrepeated GQA would have (no fast kernel takes it)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for head_dim in (64, 128):
            for gqa in (False, True):
                for masked in (False, True):
                    cfg = ModelConfig(hidden_size=8 * head_dim, num_attention_heads=8,
                                      num_key_value_heads=2 if gqa else 8)
                    attn = Attention(cfg).to(DEV)  # fp32 weights under autocast, as train runs them
                    x = torch.randn(2, 256, cfg.hidden_size, device=DEV, requires_grad=True)
                    cos, sin = rope_cos_sin(cfg, 256, DEV)
                    mask = torch.ones(2, 1, 256, 256, dtype=torch.bool, device=DEV).tril() if masked else None
                    repeat = repeats_kv(DEV, dtype, gqa, masked, head_dim)

                    def ours(a=attn) -> None:
                        with torch.autocast("cuda", dtype, enabled=dtype != torch.float32):
                            y = a(x, cos, sin, attn_mask=mask)
                        y.float().sum().backward()

                    fast = runs_under(FAST, ours)
                    attn.repeat_kv = False  # what SDPA would get without the repetition
                    bare_fast = runs_under(FAST, ours) if gqa else fast
                    # repeat only where the unrepeated call has no fast kernel; never math for ours
                    ok = fast and (repeat == (not bare_fast) if gqa else not repeat)
                    report(f"kernel {str(dtype)[6:]} head_dim {head_dim} {'gqa' if gqa else 'mha'} "
                           f"{'bool mask' if masked else 'causal'}", ok, repeats_kv=repeat,
                           ours_on_fast_kernel=fast, unrepeated_on_fast_kernel=bare_fast)


def check_flex() -> None:
    """Document masking: flex_attention (BlockMask) against SDPA with the boolean mask, same weights."""
    assert runs_flex(DEV)
    cfg = ModelConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, intermediate_size=1408)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEV)
    ids = torch.randint(1, 1000, (4, 1024), device=DEV)
    ids[ids % 37 == 0] = 0  # documents end at EOS id 0
    outs = {}
    for kind in ("flex", "bool"):
        model.zero_grad()
        mask = attention_mask(ids, 0) if kind == "flex" else attention_mask(ids.cpu(), 0).to(DEV)
        with torch.autocast("cuda", torch.bfloat16):
            logits, loss = model(ids, ids, mask)
        loss.backward()
        outs[kind] = (loss.item(), model.layers[0].self_attn.q_proj.weight.grad.float().clone())
    assert type(attention_mask(ids, 0)).__name__ == "BlockMask"
    dl = abs(outs["flex"][0] - outs["bool"][0])
    dg = ((outs["flex"][1] - outs["bool"][1]).norm() / outs["bool"][1].norm()).item()
    report("flex document masking vs SDPA boolean mask (bf16, forward and backward)", dl < 2e-3 and dg < 2e-2,
           loss_diff=f"{dl:.2e}", grad_rel_diff=f"{dg:.2e}")


def check_vote() -> None:
    """StopVote's CUDA path over a real NCCL group (one rank: the world of 2 makes it vote): the flags
    come back a step later, the host never waits on the compute stream, no synchronizing call."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1, device_id=DEV)
    vote = StopVote(world=2, device=DEV)
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    cast, got, busy, seconds = [], [], [], []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(40):
            for _ in range(4):
                a = (a @ a).clamp_(-1, 1)  # milliseconds of queued work per step
            flags = (step % 3 == 0, step % 5 == 0)
            t = time.perf_counter()
            got.append(vote(*flags))
            seconds.append(time.perf_counter() - t)
            busy.append(not torch.cuda.current_stream().query())
            cast.append(flags)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    right = got[1:] == cast[:-1] and got[0] == (False, False)
    report("stop vote on CUDA (pinned copies, side stream, event)", right and sum(busy) >= 35,
           flags_a_step_later=right, steps_with_gpu_still_busy_after_the_vote=f"{sum(busy)}/40",
           median_host_us=f"{statistics.median(seconds) * 1e6:.0f}")


def measured_peak(train: TrainConfig, precision: str) -> int:
    """The allocator's peak over the same two optimizer steps that step_memory counts."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with DEV:  # built on the card: a 1B model initialised on the host takes longer than its two steps
        model = Transformer(train.model)
    model.checkpoint_blocks = train.activation_checkpointing
    optimizer = build_optimizer(model, train, fused=True)
    ids = torch.randint(1, train.model.vocab_size, (train.micro_batch_size, train.block_size + 1), device=DEV)
    x, y = ids[:, :-1], ids[:, 1:]
    mask = attention_mask(x, 0) if train.document_masking else None
    for _ in range(2):
        for _ in range(train.gradient_accumulation_steps):
            with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                _, loss = model(x, y, mask)
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, optimizer
    return peak


def check_memory() -> None:
    """memory.step_memory (what the preflight refuses by) against the allocator's peak."""
    cases = [("gpt2-124m", 16, {}), ("gpt2-124m", 16, {"activation_checkpointing": True}),
             ("gpt2-124m", 16, {"document_masking": True}), ("gpt2-124m", 16, {"optimizer": "muon"}),
             ("1b", 4, {}), ("1b", 4, {"precision": "no"})]
    for preset, mb, extra in cases:
        precision = extra.pop("precision", "bf16")
        model = ModelConfig(**{**PRESETS[preset], "vocab_size": 50257})
        train = dataclasses.replace(TrainConfig(), model=model, micro_batch_size=mb, block_size=1024, **extra)
        repeat = repeats_kv(DEV, torch.bfloat16 if precision == "bf16" else torch.float32,
                            model.num_key_value_heads != model.num_attention_heads, False, model.head_size)
        counted = step_memory(train, precision, flex=train.document_masking, repeat_kv=repeat).total
        peak = measured_peak(train, precision)
        ratio = peak / counted
        report(f"memory {preset} x{mb} {precision} {extra or ''}".strip(), 0.85 <= ratio <= 1.1,
               counted_gib=f"{counted / GIB:.2f}", allocator_peak_gib=f"{peak / GIB:.2f}", peak_over_count=f"{ratio:.3f}")
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    report("memory outside PyTorch's allocator (CUDA context, cuBLAS, NCCL)", outside < 1.5 * GIB,
           gib=f"{outside / GIB:.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    name = torch.cuda.get_device_name()
    print(f"{name} (sm{''.join(map(str, torch.cuda.get_device_capability()))}), torch {torch.__version__}", flush=True)
    for check in (check_kernels, check_flex, check_vote, check_memory):
        try:
            check()
        except Exception as e:  # a check that breaks is a failure of its own, the others still run
            report(check.__name__, False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "checks": RESULTS}, indent=1))
    return sum(not r["ok"] for r in RESULTS)


if __name__ == "__main__":
    sys.exit(main())
