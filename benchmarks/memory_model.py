"""The memory a training step needs, and the largest micro-batch per card: where README's table comes from.

    python benchmarks/memory_model.py --preset 1b --block_size 1024 --vocab 50257 [--precision bf16]
        [--optimizer adamw] [--cards 24 40 80] [--processes 8 --sharding fsdp|ddp] [--check]

1. Bytes autograd saves per token and block: one Block's forward on fake tensors (shapes, no storage)
   under the run's autocast, counted with saved_tensors_hooks at two lengths (the difference is per
   token; what does not grow, such as bf16 copies of the weights, drops out).
2. The whole step's peak, as `train` counts it before refusing a batch (accel_pretrain.memory:
   two optimizer steps on fake tensors, every storage counted while it lives): weights, gradients
   and optimizer state (AdamW's two moments, Muon's one; DDP's gradient buckets; FSDP2's shards),
   and activations with the backward's own tensors.
3. Per card: the largest micro-batch whose peak fits, with and without --activation_checkpointing.
   A card's memory less CARD_RESERVE_GIB for the CUDA context, cuBLAS workspaces and NCCL buffers
   (not measured here: no GPU has run this yet).
4. --check: the count against a real forward pass on this CPU: glibc's allocated bytes (mallinfo2)
   grow by what the hooks count as saved plus the logits the caller holds, within 10%.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine  # noqa: E402

from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.memory import GIB, step_memory  # noqa: E402
from accel_pretrain.model import Block, Transformer, rope_cos_sin  # noqa: E402

CARD_RESERVE_GIB = 1.5
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while fn runs, leaving out those in `exclude`."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[id(storage)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for key, n in seen.items() if key not in exclude)


def block_bytes_per_token(cfg: ModelConfig, block_size: int, precision: str) -> float:
    """Saved bytes per token of one Block's forward, from the counts at block_size and twice it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    counts = []
    with FakeTensorMode(), torch.device("cpu"):
        block = Block(cfg)
        params = {id(p.untyped_storage()) for p in block.parameters()}
        for T in (block_size, 2 * block_size):
            x = torch.zeros(1, T, cfg.hidden_size, requires_grad=True)
            cos, sin = rope_cos_sin(cfg, T, x.device)
            with torch.autocast("cpu", dtype=DTYPES.get(precision, torch.bfloat16), enabled=precision in DTYPES):
                counts.append(saved_bytes(lambda: block(x, cos, sin), params))
    return (counts[1] - counts[0]) / block_size


def largest_micro_batches(train: TrainConfig, precision: str, rooms: list[int], shards: int, buckets: bool
                           ) -> list[int]:
    """For each room (bytes), the largest micro-batch whose counted peak fits (0: none). The peak
    grows with the micro-batch but not on one line (at small ones another phase of the step can be
    the peak), so: double until it does not fit, interpolate between the last two counts, settle
    on the exact one with a count or two. Counts are shared between the rooms."""
    peaks: dict[int, int] = {}

    def peak(mb: int) -> int:
        if mb not in peaks:
            peaks[mb] = step_memory(dataclasses.replace(train, micro_batch_size=mb), precision, shards, buckets).total
        return peaks[mb]

    out = []
    for room in rooms:
        if peak(1) > room:
            out.append(0)
            continue
        lo, hi = 1, 2
        while peak(hi) <= room:
            lo, hi = hi, 2 * hi
        mb = lo + int((room - peak(lo)) * (hi - lo) // (peak(hi) - peak(lo)))
        while mb > lo and peak(mb) > room:
            mb -= 1
        while mb + 1 < hi and peak(mb + 1) <= room:
            mb += 1
        out.append(mb)
    return out


def check_against_a_real_forward(precision: str) -> None:
    """Growth of glibc's allocated bytes over a forward pass of `mini` (8 x 256, vocab 8192)."""
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    allocated = lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd  # noqa: E731
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS["mini"], vocab_size=8192))
    x = torch.randint(0, 8192, (8, 257))
    params = {id(p.untyped_storage()) for p in model.parameters()}
    autocast = lambda: torch.autocast("cpu", dtype=DTYPES.get(precision, torch.bfloat16),  # noqa: E731
                                      enabled=precision in DTYPES)
    with autocast():
        model(x[:, :-1], x[:, 1:])  # warm-up: the allocator's and the kernels' one-time buffers
    held: list[torch.Tensor] = []
    before = allocated()

    def forward() -> None:
        with autocast():
            held.extend(model(x[:, :-1], x[:, 1:]))

    counted = saved_bytes(forward, params) + held[0].untyped_storage().nbytes()  # the logits the caller holds
    grown = allocated() - before
    print(f"check, mini 8 x 256, {precision}: allocated memory grew {grown / 2**20:,.1f} MiB over a forward pass; "
          f"saved tensors + logits counted {counted / 2**20:,.1f} MiB (ratio {counted / grown:.3f})")
    if abs(counted / grown - 1) > 0.10:
        sys.exit("the count is more than 10% off the real forward")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1b", choices=list(PRESETS))
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    p.add_argument("--cards", type=float, nargs="+", default=[24, 40, 80], help="card memory in GiB")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--sharding", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--check", action="store_true", help="compare the count with a real forward on this CPU")
    args = p.parse_args()
    cfg = ModelConfig(**PRESETS[args.preset], vocab_size=args.vocab)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, 2 * args.block_size)
    train = TrainConfig(block_size=args.block_size, optimizer=args.optimizer, model=cfg)
    shards = args.processes if args.sharding == "fsdp" else 1
    buckets = args.sharding == "ddp" and args.processes > 1
    print(f"{args.preset}, block {args.block_size}, vocab {args.vocab:,}, {args.precision}, {args.optimizer}, "
          f"{args.processes} process(es) {args.sharding}; counted on {machine()}")
    per_token = block_bytes_per_token(cfg, args.block_size, args.precision)
    print(f"saved for backward per token and block: {per_token:,.0f} bytes = {per_token / cfg.hidden_size:.1f} x hidden")
    one = step_memory(dataclasses.replace(train, micro_batch_size=1), args.precision, shards, buckets)
    print(f"weights + gradients + optimizer state: {one.state / GIB:.2f} GiB per process; "
          f"activations and the backward's tensors at micro-batch 1: {one.activations / GIB:.2f} GiB")
    print(f"| micro-batch per card (GiB, {CARD_RESERVE_GIB} reserved) | " + " | ".join(f"{c:g}" for c in args.cards)
          + " |")
    rooms = [int((card - CARD_RESERVE_GIB) * GIB) for card in args.cards]
    for checkpointing in (False, True):
        row = largest_micro_batches(dataclasses.replace(train, activation_checkpointing=checkpointing),
                                    args.precision, rooms, shards, buckets)
        label = "with --activation_checkpointing" if checkpointing else "plain"
        print(f"| {label} | " + " | ".join(str(mb) if mb else "does not fit" for mb in row) + " |", flush=True)
    if args.check:
        for precision in ("no", "bf16"):
            check_against_a_real_forward(precision)


if __name__ == "__main__":
    main()
