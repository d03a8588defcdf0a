"""The accelerator a launch config asks for, set up for this machine: the launches this package
cannot run right refused in one line, FSDP2's precision policy, TF32 on CUDA, glibc's allocator told
to keep freed memory on a CPU; and the way a finished process of a multi-process run exits."""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from typing import NoReturn

import torch

from .config import TrainConfig
from .errors import UserError
from .tracking import trackers_for


def start_accelerator(cfg: TrainConfig):  # noqa: ANN201 (accelerate is imported here, not at module load)
    check_launch(cfg)
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, TorchDynamoPlugin, set_seed

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        keep_freed_memory()
    allow_tf32("cpu" if on_cpu else "cuda", cfg.mixed_precision)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        # Under FSDP2 every micro-batch reduce-scatters (torchtitan does the same): FSDP2's no_sync would
        # keep each rank's whole unsharded gradient (fp32: 4 bytes per parameter) between micro-batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.gradient_accumulation_steps,
                                                                sync_each_batch=using_fsdp()),
        log_with=trackers_for(cfg.report_to) or None,
        project_dir=cfg.out,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        # Under FSDP2 each Block is compiled in place and then sharded (torchtitan's order, Accelerate's
        # regional compilation): compiling the whole model first would break its graph at every
        # block's FSDP hooks. Under DDP the whole model compiles as one graph.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=using_fsdp()) if cfg.compile
        else None,
        fsdp_plugin=fsdp_plugin(cfg.mixed_precision),
    )
    set_seed(cfg.seed)
    return accelerator


def using_fsdp() -> bool:
    """Whether the launch config asks for FSDP (Accelerate reads the same variable)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check_launch(cfg: TrainConfig) -> None:
    """Refuse, in one line and before anything starts, the launch configs this package cannot run right."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UserError("DeepSpeed is not supported; use accelerate_configs/fsdp.yaml (FSDP2 shards weights, gradients "
                        "and optimizer state like ZeRO-3; fsdp_reshard_after_forward: false keeps the weights "
                        "gathered like ZeRO-2)")
    if not using_fsdp():
        return
    if os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("the launch config asks for FSDP1, which flattens the weights (Muon cannot step them, and "
                        "checkpoints hold flat shards); set fsdp_version: 2 as accelerate_configs/fsdp.yaml does")
    if cfg.mixed_precision == "fp16":
        raise UserError("fp16 under FSDP is not supported: Accelerate's gradient scaler for FSDP2 checks each rank's "
                        "shard alone, so ranks can disagree on skipping a step; use bf16")
    refuse_fsdp_on_cpu()


def refuse_fsdp_on_cpu() -> None:
    if not torch.cuda.is_available():
        raise UserError("the launch config asks for FSDP, which Accelerate runs only on GPUs (on CPU it fails, or "
                        "trains unsharded without a word); use cpu_ddp.yaml on a CPU")


def fsdp_plugin(precision: str):  # noqa: ANN201
    """Under an FSDP launch config: FSDP2 as the config sets it (Accelerate reads its FSDP_* variables),
    in bf16 with bf16 weights for compute and gradients reduced in fp32, as torchtitan does.
    Accelerate's own bf16 policy would also reduce in bf16 and hand back the loss in bf16."""
    if not using_fsdp():
        return None
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(mixed_precision_policy=fsdp_precision(precision))


def fsdp_precision(precision: str):  # noqa: ANN201
    """FSDP2's precision policy for a run's mixed_precision: under bf16, bf16 weights for compute and
    gradients reduced in fp32; else None (FSDP2's default: no casts)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None


def allow_tf32(device_type: str, precision: str) -> bool:
    """fp32 matmuls and convolutions on TF32 tensor cores on CUDA (Ampere and later): 8x the fp32
    rate for a 10-bit mantissa in the products, sums kept in fp32, as single_gpu.yaml promises and
    the MFU peak assumes. Not on a CPU, where "high" precision would let oneDNN change kernels."""
    if device_type != "cuda" or precision != "no":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.
    With its defaults (blocks over 128 KiB mapped afresh, the threshold raised only to the largest
    block freed so far and never past 32 MiB, the heap top trimmed beyond twice that), a CPU step's
    tensors are page-faulted in again and again: the logits of 2,048 tokens x 8,192 ids (64 MiB) and
    their gradient on every pass (16,384 faults each; a log_softmax costs 4x its arithmetic), an
    RMSNorm's 3 MB blocks of (8, 256, 384) on some passes, as the randomised heap layout has it (40 to
    720 faults per forward and backward). After this call the large blocks come from the heap and are
    never faulted in again (tests/test_train.py), and the small ones far less often: 5% of an fp32
    step, 10% of a bf16 one. PyTorch's CPU tuning guide preloads
    jemalloc or tcmalloc for the same reason; two mallopt settings get the reuse from the allocator
    every Linux already has: no mmap for large blocks (glibc still falls back to it where the heap
    cannot grow), and no trimming until 1 GiB is free at the heap top. Returns whether they were
    applied (not on macOS, Windows or musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def process_start() -> float:
    """When this process started (Unix time): a --time_limit counts from there, imports included."""
    import psutil

    return psutil.Process().create_time()


def leave(code: int) -> NoReturn:
    """Exit; a process of a multi-process run that ended well skips the interpreter's finalization.

    A gloo worker thread may still be freeing the last collective's tensors when Python starts to
    finalize; it then needs the GIL, which finalization refuses, and the process aborts with
    "terminate called without an active exception" (about one cpu_ddp run in twenty, after a
    successful end; pytorch/pytorch#179291). The threads cannot be joined first: DDP keeps
    references to the process group that outlive it. Everything of value is on disk by now
    (checkpoints and train_log.jsonl are closed after each write, trackers finished), so the
    process flushes its streams and ends without finalization. A failed run exits normally: the
    launcher stops the other ranks as soon as one fails, and rank 0 may still be printing the error."""
    if code != 0 or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
