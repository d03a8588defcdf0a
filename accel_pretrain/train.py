"""Pretraining loop. One code path for a laptop CPU, one GPU, DDP, FSDP and several nodes:
only the `accelerate launch` config changes.

    accelerate launch [--config_file accelerate_configs/NAME.yaml] -m accel_pretrain.train \\
        --data DIR --out RUN [--config FILE.yaml] [--preset NAME] [--FIELD VALUE ...]

Reads like the flowchart: get_batch -> model(x) -> cross_entropy -> backward (accumulate) ->
clip_grad_norm_ -> AdamW + schedule -> eval / checkpoint / train_log.jsonl."""
from __future__ import annotations

import ctypes
import logging
import math
import os
import pickle
import platform
import re
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, NoReturn

import torch

from . import __version__
from .checkpoint import list_checkpoints, save_checkpoint
from .config import (MODEL_FIELDS, TrainConfig, changes, flatten, help_text, model_config_from_dict, resolve,
                     resolve_precision)
from .data import TokenData, check_same_tokenizer, step_windows
from .errors import UserError, run_cli
from .evaluate import metrics, score
from .memory import GIB, free_bytes, generous_bound, largest_micro_batch, step_memory
from .model import Transformer, attention_mask
from .optim import apply_config_to_schedule, build_optimizer, build_scheduler
from .rundir import check_steps, claim_run_dir, write_run_dir
from .stopping import Deadline, StopRequest, StopVote, parse_duration
from .tracking import RunLog, peak_flops, read_log, trackers_for

# Peak resident memory over the tensors counted by memory.step_memory: glibc's heap and the CPU
# kernels' own buffers (`mini`, fp32, 256 tokens a window: 1.30x at micro-batch 100 and 1.25x at 200
# with an 8k vocabulary, 1.23x at 64 with GPT-2's 50k; peak RSS less the RSS at start).
ALLOCATOR_OVERHEAD = {"cpu": 1.3}
SKIP_LIMIT = 25  # fp16: overflowing steps in a row before the run stops
PRECISION = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}


class SpikeWatch:
    """Flags a logged training loss far above the median of the recent ones: more than half a nat
    and six median absolute deviations above it (the noise of the recent steps). Once per spike:
    it re-arms when a loss comes back under the line. Costs nothing: the loss is already read."""

    WINDOW, MIN_GAP, MADS = 20, 0.5, 6.0

    def __init__(self, history: list[float]) -> None:
        self.recent = history[-self.WINDOW:]
        self.armed = True

    def check(self, loss: float) -> float | None:
        """The median a spike rose above, or None."""
        spike = None
        if len(self.recent) >= self.WINDOW // 2:
            median = statistics.median(self.recent)
            mad = statistics.median(abs(x - median) for x in self.recent)
            above = loss > median + max(self.MIN_GAP, self.MADS * mad) or not math.isfinite(loss)
            spike = median if above and self.armed else None
            self.armed = not above
        self.recent = (self.recent + [loss])[-self.WINDOW:]
        return spike


def host_to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned memory on CUDA, so the copy runs asynchronously while the GPU works on the last step."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


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


def param_checksum(model: torch.nn.Module) -> float:
    """A float64 sum over all weights: equal on every rank exactly when the replicas agree. Under
    FSDP2 a weight is a DTensor whose sum is partial on each rank: full_tensor() adds the shards."""
    sums = (p.detach().double().sum() for p in model.parameters())
    return float(sum(t.full_tensor() if hasattr(t, "full_tensor") else t for t in sums))


def check_trackers(report_to: str) -> None:
    """Fail before anything is written when a tracker cannot start (no wandb login, no tensorboard)."""
    if report_to in ("wandb", "all") and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled",
                                                                                          "dryrun"):
        try:
            import wandb
        except ImportError:
            raise UserError("--report_to wandb needs the wandb package: pip install wandb") from None
        try:
            wandb.Api(timeout=10)
        except Exception as e:  # wandb raises its own UsageError when no API key is configured
            if "api key" in str(e).lower():
                raise UserError("--report_to wandb needs a login: run `wandb login`, set WANDB_API_KEY, or set "
                                "WANDB_MODE=offline to log locally") from None
        finally:
            wandb.teardown()  # Api() sets up wandb's process-wide state; the run sets it up again itself
    if report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None


def check_resume(ckpt: Path, state: dict[str, Any], cfg: TrainConfig, data: TokenData) -> None:
    """The checkpoint's model shape and data must be this run's."""
    saved = asdict(model_config_from_dict(state["model_config"]))  # fields it predates take their defaults
    diffs = [f"{k} {saved[k]} -> {v}" for k, v in cfg.to_dict()["model"].items()
             if k != "initializer_range" and saved[k] != v]
    if diffs:
        raise UserError(f"cannot resume {ckpt}: the model shape differs ({', '.join(diffs)})")
    if state.get("data_fingerprint") != data.fingerprint():
        raise UserError(f"cannot resume {ckpt}: it was trained on other data ({state.get('data_dir')}); "
                        "resume with the same --data")


def configure(argv: list[str]) -> tuple[TrainConfig, TokenData, str]:
    """The resolved, validated config, its data, and why the precision is what it is."""
    cfg = resolve(argv)
    shape = sorted(cfg.given & ({"preset"} | set(MODEL_FIELDS)))
    if cfg.init_from and shape and not cfg.resume:
        raise UserError(f"--init_from takes the model's shape from the checkpoint; drop {', '.join('--' + k for k in shape)}")
    data = TokenData(cfg.data)
    if cfg.init_from is None:
        cfg.model.vocab_size = data.vocab_size
    cfg.validate()
    from_run = "mixed_precision" in cfg.carried
    if from_run and cfg.mixed_precision is None:  # saved by a version that left it to the launch config
        cfg.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    cfg.mixed_precision, why = resolve_precision(cfg.mixed_precision)
    why = "the run's config.json" if from_run else why
    data.check_block_size(cfg.block_size)
    if cfg.eval_tasks:
        from .downstream import load_tasks

        load_tasks(task_names(cfg), cfg.eval_tasks_dir)  # unknown names and offline data: refused before anything
    if cfg.time_limit is not None:
        cfg.time_limit = str(cfg.time_limit)  # a YAML number of seconds
        parse_duration(cfg.time_limit)
    if cfg.document_masking and data.meta.get("eos_token_id") is None:
        raise UserError(f"--document_masking needs the EOS id that ends each document; {data.spec} has none in meta.json")
    return cfg, data, why


def data_mixture(data: TokenData) -> dict[str, Any]:
    """For config.json: the weights a mixture is drawn with, normalised to sum to 1."""
    return {"data_mixture": {path: w for path, w in data.sources}} if len(data.sources) > 1 else {}


def mixture_line(data: TokenData) -> str:
    given = data.given_weights
    line = "data mixture: " + ", ".join(f"{path} {w:.1%}" for path, w in data.sources)
    if abs(sum(given) - 1) > 1e-9:
        line += f" (the weights given sum to {sum(given):g}; each is divided by that)"
    return line


def check_memory(cfg: TrainConfig, model: Transformer, accelerator) -> None:
    """Refuse, before anything is written, a batch whose step cannot fit the device's free memory
    (GPU) or the RAM available (CPU) of any rank, as memory.step_memory counts the step's peak.
    Every rank takes the same decision, so none goes on to write the run directory alone."""
    from accelerate.utils import gather_object

    verdicts = [memory_verdict(cfg, model, accelerator)]
    if accelerator.num_processes > 1:
        verdicts = gather_object(verdicts)
    if refusal := next((v for v in verdicts if v), None):
        raise UserError(refusal)


def memory_verdict(cfg: TrainConfig, model: Transformer, accelerator) -> str | None:
    """This rank's refusal, or None when the step fits."""
    mb, T = cfg.micro_batch_size, cfg.block_size
    device = accelerator.device
    free, where = free_bytes(device)
    # On a CPU the weights already sit in the RAM that free_bytes leaves out.
    resident = sum(p.numel() * p.element_size() for p in model.parameters()) if device.type == "cpu" else 0
    margin = ALLOCATOR_OVERHEAD.get(device.type, 1.0)
    if generous_bound(cfg.model, mb, T, cfg.document_masking) * margin <= free + resident:
        return None
    kind, world = accelerator.distributed_type.name, accelerator.num_processes
    need = step_memory(cfg, accelerator.mixed_precision, shards=world if kind == "FSDP" else 1,
                       bucket_copy=kind == "MULTI_GPU" and world > 1, flex=device.type == "cuda")
    room = (free + resident) / margin  # what the counted tensors may take
    if need.total <= room:
        return None
    return (f"a step of micro-batch {mb} x {T} tokens needs about {need.total * margin / GIB:.1f} GiB "
            f"({need.activations / GIB:.1f} GiB of activations and the backward's tensors, {need.state / GIB:.1f} "
            f"GiB of weights, gradients and optimizer state" + (f", x{margin} for the allocator" if margin > 1 else "")
            + f"), but only {free / GIB:.1f} GiB {where}; "
            + memory_advice(cfg, min(largest_micro_batch(need, room), mb - 1)))


def memory_advice(cfg: TrainConfig, fits: int | None) -> str:
    """What to lower, keeping the tokens per optimizer step."""
    mb, ga = cfg.micro_batch_size, cfg.gradient_accumulation_steps
    if fits == 0:
        return (f"not even one window of {cfg.block_size} tokens fits: lower --block_size, use a smaller model"
                + ("" if cfg.activation_checkpointing else ", or pass --activation_checkpointing"))
    smaller = fits if fits else max(1, mb // 2)
    while mb * ga % smaller:  # a divisor, so the tokens per step stay exactly the same
        smaller -= 1
    text = (f"lower --micro_batch_size to {smaller} and raise --gradient_accumulation_steps to "
            f"{mb * ga // smaller} to keep {mb * ga * cfg.block_size:,} tokens per step and process")
    return text + ("" if cfg.activation_checkpointing else ", or pass --activation_checkpointing")


@contextmanager
def out_of_memory_as_user_error(cfg: TrainConfig) -> Iterator[None]:
    """An allocation that fails (torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError)
    becomes one line with the size it tried and what to lower."""
    try:
        yield
    except RuntimeError as e:
        text = str(e)
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in text:
            raise
        tried = re.search(r"(?i)tried to allocate (\d+) bytes", text)
        size = f"{int(tried[1]) / GIB:.2f} GiB" if tried else (re.search(r"(?i)tried to allocate ([\d.]+ \w+)", text)
                                                                 or ["", "memory"])[1]
        line = (f"out of memory: a step of micro-batch {cfg.micro_batch_size} x {cfg.block_size} tokens tried to "
                f"allocate {size} more; " + memory_advice(cfg, None))
        rank = int(os.environ.get("RANK", "0"))
        if rank:  # one rank alone ran out: the CLI prints rank 0's errors only, so this one says it itself
            print(f"error: rank {rank}: {line}", file=sys.stderr, flush=True)
        raise UserError(line) from None


def build_model(cfg: TrainConfig, data: TokenData) -> Transformer:
    if cfg.init_from:
        from .hf import from_hf_pretrained

        check_same_tokenizer(data, cfg.init_from, "the --init_from model")
        model = from_hf_pretrained(cfg.init_from)
        if model.config.vocab_size < data.vocab_size:
            raise UserError(f"--init_from model has {model.config.vocab_size} tokens, the data {data.vocab_size}: "
                            "prepare the data with that model's tokenizer (--tokenizer)")
        cfg.model = model.config
        return model
    return Transformer(cfg.model)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__ + "\n" + help_text())
        return 0
    cfg, data, precision_why = configure(argv)
    with StopRequest() as stop, out_of_memory_as_user_error(cfg), ExitStack() as held:
        run = setup(cfg, data, precision_why, held)
        if run is None:  # nothing left to do: the run is complete
            return 0
        done = run.start_step
        run.model.train()
        for step in range(run.start_step, run.cfg.max_steps):
            batch = get_batch(run, step)
            result = optimizer_step(run, batch, step)
            done = step + 1
            run.deadline.step_done()
            stopping = run.vote(stop.requested or run.deadline.due())
            periodic_actions(run, result, done, stopping)
            if stopping:
                why = ("by signal" if stop.requested else "before the time limit" if run.deadline.due()
                       else "because another process was asked to")
                run.accelerator.print(f"\nstopped {why} at step {done}; checkpoint saved, continue with --resume")
                break
        finish(run, done)
    return 0


@dataclass
class Run:
    """What the loop carries from one step to the next."""

    cfg: TrainConfig
    data: TokenData
    accelerator: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    log: RunLog
    bar: Any
    state: dict[str, Any]  # the checkpoint's train state when resuming, else {}
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float | None  # per device, for MFU (None: unknown)
    eos: int | None  # documents end at EOS when --document_masking
    spikes: SpikeWatch
    tokenizer: Any  # the data's, for --eval_tasks (else None)
    vote: StopVote
    deadline: Deadline
    tokens_seen: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_last: float = field(default_factory=time.perf_counter)
    tokens_last: int = 0
    # The first optimizer step whose gradient norm was not finite, or (fp16) that made the gradient
    # scaler skip SKIP_LIMIT steps in a row (0: none), with its norm; kept on the device and read only
    # where the loop syncs anyway (log, eval, save): no host sync per step on a GPU.
    bad_step: torch.Tensor | None = None
    bad_norm: torch.Tensor | None = None
    skipped: torch.Tensor | None = None  # fp16: whether the last step was skipped
    skip_streak: torch.Tensor | None = None  # fp16: skipped steps in a row

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def start_step(self) -> int:
        return self.state.get("step", 0)

    def elapsed(self) -> float:
        return self.state.get("elapsed_s", 0.0) + time.perf_counter() - self.t_start


class StepResult(NamedTuple):
    loss_sum: torch.Tensor  # summed over the micro-batches, on the device
    grad_norm: torch.Tensor
    lr: float


def setup(cfg: TrainConfig, data: TokenData, precision_why: str, held: ExitStack) -> Run | None:
    """Run directory, model, optimizer and log, checked in the order that writes nothing before
    every check has passed; None when a resumed run is already complete. `held` keeps the run
    directory's lock until the run ends."""
    check_trackers(cfg.report_to)
    accelerator = start_accelerator(cfg)
    ckpt, state = claim_run_dir(cfg, accelerator, held)
    if ckpt and not check_steps(cfg, ckpt, state):
        return None
    model = build_model(cfg, data)
    model.checkpoint_blocks = cfg.activation_checkpointing
    data.check_ids_below(cfg.model.vocab_size)
    if ckpt:
        check_resume(ckpt, state, cfg, data)
    check_memory(cfg, model, accelerator)
    tokenizer = task_tokenizer(cfg, data, accelerator)
    write_run_dir(cfg, data, accelerator, fresh=not ckpt, extra=data_mixture(data))

    optimizer = build_optimizer(model, cfg, fused=accelerator.device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ckpt:
        try:
            accelerator.load_state(str(ckpt))  # safetensors + torch.load(weights_only=True): no code runs
        except (pickle.UnpicklingError, RuntimeError, OSError) as e:
            raise UserError(f"cannot load checkpoint {ckpt} safely ({str(e).splitlines()[0][:200]}); "
                            "resume from another checkpoint") from None
        apply_config_to_schedule(scheduler, cfg)
    run = Run(cfg=cfg, data=data, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
              log=RunLog(Path(cfg.out) / "train_log.jsonl", accelerator.is_main_process), bar=None, state=state,
              tokens_per_step=cfg.micro_batch_size * cfg.block_size * cfg.gradient_accumulation_steps
              * accelerator.num_processes,
              flops_per_token=accelerator.unwrap_model(model).flops_per_token(cfg.block_size),
              peak_flops=peak_flops(accelerator.device, accelerator.mixed_precision, cfg.peak_flops),
              eos=data.meta.get("eos_token_id") if cfg.document_masking else None, spikes=SpikeWatch([]),
              tokenizer=tokenizer, vote=StopVote(accelerator.num_processes), deadline=Deadline(cfg.time_limit, checkpoint_bytes(model),
                                                                          process_start()),
              tokens_seen=state.get("tokens_seen", 0), tokens_last=state.get("tokens_seen", 0),
              bad_step=torch.zeros((), dtype=torch.long, device=accelerator.device),
              bad_norm=torch.zeros((), device=accelerator.device),
              skipped=torch.zeros((), dtype=torch.bool, device=accelerator.device),
              skip_streak=torch.zeros((), dtype=torch.long, device=accelerator.device))
    open_log(run, ckpt, precision_why)
    return run


def task_tokenizer(cfg: TrainConfig, data: TokenData, accelerator) -> Any:
    """The tokenizer --eval_tasks encode with: the data's (an --init_from model's is the same, checked).
    Generation tasks are refused under FSDP: each rank would decode as many steps as its own
    documents need, and the sharded model needs every rank in every forward."""
    if not cfg.eval_tasks:
        return None
    from transformers import AutoTokenizer

    from .downstream import load_tasks

    if accelerator.distributed_type.name == "FSDP":
        _, loaded = load_tasks(task_names(cfg), cfg.eval_tasks_dir)
        if generating := [n for n, t in loaded["tasks"].items() if t.OUTPUT_TYPE == "generate_until"]:
            raise UserError(f"--eval_tasks {', '.join(generating)} generate text, which FSDP cannot do during training; "
                            "score them after it with python -m accel_pretrain.evaluate RUN --tasks ...")
    if not (data.dir / "tokenizer").is_dir():
        raise UserError(f"--eval_tasks needs the tokenizer the data was prepared with; {data.dir}/tokenizer is missing")
    return AutoTokenizer.from_pretrained(str(data.dir / "tokenizer"))


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """This process's bytes of a checkpoint: weights and AdamW's two moments (Muon's one is smaller)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def process_start() -> float:
    """When this process started (Unix time): a --time_limit counts from there, imports included."""
    import psutil

    return psutil.Process().create_time()


def check_launch(cfg: TrainConfig) -> None:
    """Refuse, in one line and before anything starts, the launch configs this package cannot run right."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UserError("DeepSpeed is not supported; use accelerate_configs/fsdp.yaml (FSDP2 shards weights, gradients "
                        "and optimizer state like ZeRO-3; fsdp_reshard_after_forward: false keeps the weights "
                        "gathered like ZeRO-2)")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
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
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return None
    from accelerate import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    return FullyShardedDataParallelPlugin(mixed_precision_policy=policy)


def start_accelerator(cfg: TrainConfig):  # noqa: ANN201 (accelerate is imported here, not at module load)
    check_launch(cfg)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        keep_freed_memory()
    allow_tf32("cpu" if on_cpu else "cuda", cfg.mixed_precision)
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers_for(cfg.report_to) or None,
        project_dir=cfg.out,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        dynamo_backend="inductor" if cfg.compile else None,
        fsdp_plugin=fsdp_plugin(cfg.mixed_precision),
    )
    set_seed(cfg.seed)
    return accelerator


def allow_tf32(device_type: str, precision: str) -> bool:
    """fp32 matmuls and convolutions on TF32 tensor cores on CUDA (Ampere and later): 8x the fp32
    rate for a 10-bit mantissa in the products, sums kept in fp32, as single_gpu.yaml promises and
    the MFU peak assumes. Not on a CPU, where "high" precision would let oneDNN change kernels."""
    if device_type != "cuda" or precision != "no":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return True


def open_log(run: Run, ckpt: Path | None, precision_why: str) -> None:
    """train_log.jsonl's header (after dropping lines a resume redoes), trackers, the banner, the bar."""
    from tqdm.auto import tqdm

    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    world, mixed = accelerator.num_processes, accelerator.mixed_precision
    mb, ga, T = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.block_size
    n_params = sum(p.numel() for p in accelerator.unwrap_model(run.model).parameters())
    if ckpt:
        run.log.truncate_after(run.start_step)
        if accelerator.is_main_process:  # a resume keeps the run's recent losses for the spike watch
            run.spikes = SpikeWatch([r["loss"] for r in read_log(run.log.path) if "loss" in r])
    run.log.write({"event": "resume" if ckpt else "run", "step": run.start_step, "world_size": world,
                   "mixed_precision": mixed, "parameters": n_params, "tokens_per_step": run.tokens_per_step,
                   "device": str(accelerator.device), "version": __version__,
                   "config": cfg.to_dict() | data_mixture(data)})
    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.project_name, config={k: v for k, v in cfg.to_dict().items() if k != "model"}
                                  | {f"model.{k}": v for k, v in cfg.to_dict()["model"].items()})
    if ckpt and (changed := changes(flatten(run.state.get("config", {})), cfg)):
        accelerator.print("resuming with " + ", ".join(changed))
    if len(data.sources) > 1:
        accelerator.print(mixture_line(data))
    accelerator.print(f"{n_params / 1e6:.2f}M parameters | world size {world} | {PRECISION.get(mixed, mixed)} "
                      f"({precision_why}) | "
                      f"{run.tokens_per_step:,} tokens per step ({mb} x {T} x {ga} accumulation x {world} processes)"
                      + (f" | resuming from {ckpt}" if ckpt else ""))
    run.bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc="train", dynamic_ncols=True,
                   disable=None if accelerator.is_local_main_process else True)
    run.t_start = run.t_last = time.perf_counter()


def get_batch(run: Run, step: int) -> torch.Tensor:
    """This step's windows for this rank (a pure function of seed, step and rank), on the device."""
    cfg = run.cfg
    windows = step_windows(run.data.train, cfg.micro_batch_size * cfg.gradient_accumulation_steps, cfg.block_size,
                           cfg.seed, step, run.accelerator.process_index)
    return host_to_device(windows, run.accelerator.device)


def optimizer_step(run: Run, batch: torch.Tensor, step: int) -> StepResult:
    """model(x) -> cross_entropy -> backward for each micro-batch under accumulate(), then
    clip_grad_norm_ -> optimizer -> schedule once the gradients are synchronised."""
    accelerator, model, mb = run.accelerator, run.model, run.cfg.micro_batch_size
    loss_sum = torch.zeros((), device=accelerator.device)
    lr = run.optimizer.param_groups[0]["lr"]
    for micro in range(run.cfg.gradient_accumulation_steps):
        xy = batch[micro * mb:(micro + 1) * mb]
        x, y = xy[:, :-1], xy[:, 1:]
        with accelerator.accumulate(model):
            _, loss = model(x, y, attention_mask(x, run.eos))
            accelerator.backward(loss)
            loss_sum += loss.detach()
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.cfg.grad_clip or math.inf)
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
                    grad_norm = grad_norm.full_tensor()
                update(run, grad_norm, step)
    run.tokens_seen += run.tokens_per_step
    run.bar.update(1)
    return StepResult(loss_sum, grad_norm, lr)


def update(run: Run, grad_norm: torch.Tensor, step: int) -> None:
    """Optimizer and schedule. A non-finite gradient norm is recorded on the device (the step is
    taken: the run stops at the next log, eval or save, before anything is written). Under fp16 the
    gradient scaler skips such a step itself, and its scale shows it: update() halves the scale
    exactly when it found an inf or NaN, whether the optimizer's step() ran (Accelerate's
    optimizer_step_was_skipped) or a fused optimizer skipped internally (which Accelerate cannot
    see). SKIP_LIMIT skipped steps in a row stop the run like a non-finite norm."""
    scaler = run.accelerator.scaler
    scale = scaler._scale.clone() if scaler is not None else None
    if scaler is None:
        new_bad = (run.bad_step == 0) & ~torch.isfinite(grad_norm)
    run.optimizer.step()
    if scaler is not None:
        run.skipped = scaler._scale < scale
        run.skip_streak = torch.where(run.skipped, run.skip_streak + 1, 0)
        new_bad = (run.bad_step == 0) & (run.skip_streak > SKIP_LIMIT)
    run.bad_step = torch.where(new_bad, step + 1, run.bad_step)
    run.bad_norm = torch.where(new_bad, grad_norm.float(), run.bad_norm)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def periodic_actions(run: Run, result: StepResult, done: int, stopping: bool) -> None:
    """Log, evaluate and save when their interval (or the last step, or a stop) comes; a
    non-finite step recorded on the device stops the run before any of them writes."""
    cfg = run.cfg
    logging = done % cfg.log_interval == 0 or done == 1 or done == cfg.max_steps
    evaluating = done % cfg.eval_interval == 0 or done == cfg.max_steps
    scoring = bool(cfg.eval_tasks) and (done % (cfg.eval_tasks_interval or cfg.save_interval) == 0
                                        or done == cfg.max_steps)
    saving = done % cfg.save_interval == 0 or done == cfg.max_steps or stopping or scoring
    if (logging or evaluating or saving) and (first := int(run.bad_step)):
        raise_nonfinite(run, first)
    if logging:
        log_step(run, result, done)
    if evaluating:
        m = evaluate_step(run, done)
        if run.accelerator.is_main_process:
            run.bar.write(f"step {done}: val_loss {m['loss']:.4f}, ppl {m['perplexity']:.2f}")
    if saving:
        started = time.monotonic()
        save_checkpoint(run.accelerator, run.dir, done, train_state(run, done), cfg.keep_checkpoints)
        run.deadline.saved(time.monotonic() - started)
    if scoring and not stopping:  # after the save: a run killed while scoring loses nothing
        score_tasks(run, done)


def task_names(cfg: TrainConfig) -> list[str]:
    return [t.strip() for t in (cfg.eval_tasks or "").split(",") if t.strip()]


def score_tasks(run: Run, done: int) -> None:
    """--eval_tasks through lm-eval, each rank scoring a share of the documents; one train_log.jsonl
    line ({"step", "tasks/TASK/METRIC": value, ..., "tasks/core"}) and tracker record. The model
    unwrapped: under DDP or --compile the plain module (no recompilation for the tasks' shapes),
    under FSDP2 the sharded one, which every rank calls as often (lm-eval pads the requests)."""
    from .downstream import flat_metrics, make_task_lm, run_tasks

    cfg, accelerator = run.cfg, run.accelerator
    model = accelerator.unwrap_model(run.model)
    lm = make_task_lm(model, run.tokenizer, cfg.micro_batch_size, accelerator.device, accelerator.process_index,
                      accelerator.num_processes, autocast=accelerator.autocast)
    model.eval()
    try:
        scores = run_tasks(lm, task_names(cfg), cfg.eval_tasks_dir, cfg.eval_tasks_limit or None, None)
    finally:
        model.train()
    if scores is None:  # not rank 0
        return
    record = {"step": done, **flat_metrics(scores)}
    run.log.write(record)
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=done)
    core = f", CORE {scores['core']:.3f}" if scores.get("core") is not None else ""
    run.bar.write(f"step {done}: " + ", ".join(f"{t} {m.get('acc,none', float('nan')):.3f}"
                                               for t, m in sorted(scores["results"].items()) if "acc,none" in m) + core)


def log_step(run: Run, result: StepResult, done: int) -> None:
    """One train_log.jsonl line (and tracker record), the bar or a plain line, and the spike watch."""
    cfg, accelerator = run.cfg, run.accelerator
    now = time.perf_counter()
    tps = (run.tokens_seen - run.tokens_last) / max(now - run.t_last, 1e-9)
    run.t_last, run.tokens_last = now, run.tokens_seen
    peak = run.peak_flops
    record = {"step": done, "tokens": run.tokens_seen,
              "loss": accelerator.reduce(result.loss_sum / cfg.gradient_accumulation_steps, "mean").item(),
              "lr": result.lr, "grad_norm": result.grad_norm.item(), "tokens_per_s": tps,
              "mfu": run.flops_per_token * tps / accelerator.num_processes / peak if peak else None,
              "elapsed_s": run.state.get("elapsed_s", 0.0) + now - run.t_start}
    if accelerator.scaler is not None:
        record["skipped_step"] = bool(run.skipped)
    run.log.write(record)
    if (spike := run.spikes.check(record["loss"])) and accelerator.is_main_process:
        run.log.write({"event": "spike", "step": done, "median": spike})  # the step's own line has the loss
        last = list_checkpoints(run.dir)
        run.bar.write(f"warning: loss spike at step {done}: {record['loss']:.3f} against a median of {spike:.3f} over "
                      f"the last {len(run.spikes.recent)} logged steps; if it does not come back down, resume from "
                      f"{last[-1] if last else 'the start'} with a lower --lr (README: \"When a run diverges\")",
                      file=sys.stderr)
    accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=done)
    run.bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{result.lr:.2e}", refresh=False)
    if run.bar.disable and accelerator.is_main_process:  # not a terminal (make, CI, SLURM): a plain line
        eta = (cfg.max_steps - done) * run.tokens_per_step / max(tps, 1e-9)
        print(f"step {done}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {result.lr:.2e} | {tps:,.0f} tok/s | "
              f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", flush=True)


def evaluate_step(run: Run, done: int) -> dict[str, float]:
    """Validation loss on the fixed windows, each rank scoring its share."""
    cfg, accelerator = run.cfg, run.accelerator
    mb = cfg.micro_batch_size
    loss_sum, count = score(run.model, run.data.valid, cfg.block_size, mb, cfg.eval_iters * mb, accelerator.device,
                            accelerator.process_index, accelerator.num_processes, run.eos)
    m = metrics(accelerator.reduce(loss_sum, "sum").item(), accelerator.reduce(count, "sum").item(),
                run.data.bytes_per_token)
    record = {"step": done, "val_loss": m["loss"], "val_ppl": m["perplexity"], "val_bpb": m.get("bits_per_byte")}
    run.log.write(record)
    accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=done)
    return m


def train_state(run: Run, step: int) -> dict[str, Any]:
    """Our part of a checkpoint: where the run is and what it was trained on."""
    cfg, data = run.cfg, run.data
    return {"step": step, "tokens_seen": run.tokens_seen, "data_fingerprint": data.fingerprint(),
            "tokenizer_sha256": data.tokenizer_sha256,
            "data_dir": str(data.dir), "model_config": cfg.to_dict()["model"],
            "world_size": run.accelerator.num_processes, "elapsed_s": run.elapsed(), "config": cfg.to_dict()}


def finish(run: Run, done: int) -> None:
    """Replicas must agree after training: a gathered checksum per rank makes that checkable."""
    accelerator = run.accelerator
    run.bar.close()
    run.vote.result()  # the last step's vote: no collective may be in flight when the group goes
    sums = accelerator.gather(torch.tensor([param_checksum(run.model)], device=accelerator.device,
                                           dtype=torch.float64))
    run.log.write({"event": "end", "step": done, "param_checksums": sums.tolist()})
    accelerator.wait_for_everyone()  # no rank tears down the process group while another still uses it
    accelerator.end_training()


def raise_nonfinite(run: Run, step: int) -> NoReturn:
    """Stop a run whose gradients went non-finite, with its record in train_log.jsonl."""
    saved = list_checkpoints(run.dir)
    run.log.write({"event": "nonfinite", "step": step, "grad_norm": float(run.bad_norm)})
    where = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
    if run.accelerator.scaler is not None:
        raise UserError(f"fp16: the gradients overflowed on {SKIP_LIMIT + 1} steps in a row (the gradient scaler "
                        f"skipped them) up to step {step}; stopped without saving ({where}); --resume with a lower "
                        "--lr, or train in bf16")
    raise UserError(f"non-finite loss or gradient norm at step {step}; stopped without saving ({where}); "
                    "--resume with a lower --lr")


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


if __name__ == "__main__":
    leave(run_cli(main))
