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
import shutil
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

import torch

from . import __version__
from .checkpoint import list_checkpoints, read_state, resolve_checkpoint, save_checkpoint
from .config import (MODEL_FIELDS, TrainConfig, changes, flatten, help_text, model_config_from_dict, resolve,
                     save_json)
from .data import TokenData, check_same_tokenizer, step_windows
from .errors import UserError, run_cli
from .evaluate import metrics, score
from .model import Transformer, document_mask
from .optim import apply_config_to_schedule, build_optimizer, build_scheduler
from .tracking import RunLog, peak_flops, trackers_for

RUN_FILES = ("config.json", "train_log.jsonl", "checkpoints", "tokenizer")
PRECISION = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}


class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop checkpoints at the end of the current step and exits.
    The previous handlers come back when the run ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopRequest":
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


def host_to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned memory on CUDA, so the copy runs asynchronously while the GPU works on the last step."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.
    With its defaults (blocks over 128 KiB mapped afresh, the threshold raised only to the largest
    block freed so far and never past 32 MiB, the heap top trimmed beyond twice that), a CPU step's
    tensors are page-faulted in again and again: 900 to 2,400 page faults per RMSNorm forward and
    backward of (8, 256, 384), and the logits of 2,048 tokens x 8,192 ids (64 MiB) cost a log_softmax
    4x its arithmetic. After this call both come from the heap, none of it faulted in again
    (tests/test_train.py): 5% of an fp32 step, 10% of a bf16 one. PyTorch's CPU tuning guide preloads
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
    """A float64 sum over all weights: equal on every rank exactly when the replicas agree."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def prepare_run_dir(cfg: TrainConfig) -> Path | None:
    """Check the run directory before anything is written; return the checkpoint to resume from."""
    run = Path(cfg.out)
    has_run = run.is_dir() and any((run / name).exists() for name in RUN_FILES)
    if cfg.resume == "auto":  # a (re)queued job: continue when there is something to continue
        if list_checkpoints(run):
            return resolve_checkpoint(run)
        cfg.resume, cfg.overwrite = None, True  # nothing to lose: no checkpoint was ever written
        return None
    if cfg.resume:
        if cfg.resume == "latest":
            if not list_checkpoints(run):
                raise UserError(f"--resume: {run} holds no checkpoint (the run stopped before its first save); "
                                "start it again with --overwrite")
            return resolve_checkpoint(run)
        return resolve_checkpoint(cfg.resume)
    if has_run and not cfg.overwrite:
        if not list_checkpoints(run):
            raise UserError(f"{run} holds a run that stopped before its first checkpoint; pass --overwrite to start "
                            "over, or choose another --out")
        raise UserError(f"{run} already holds a run; pass --resume to continue it or --overwrite to start over")
    return None


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


def check_resume(ckpt: Path, cfg: TrainConfig, data: TokenData) -> dict[str, Any]:
    state = read_state(ckpt)
    saved = asdict(model_config_from_dict(state["model_config"]))  # fields it predates take their defaults
    diffs = [f"{k} {saved[k]} -> {v}" for k, v in cfg.to_dict()["model"].items()
             if k != "initializer_range" and saved[k] != v]
    if diffs:
        raise UserError(f"cannot resume {ckpt}: the model shape differs ({', '.join(diffs)})")
    if state.get("data_fingerprint") != data.fingerprint():
        raise UserError(f"cannot resume {ckpt}: it was trained on other data ({state.get('data_dir')}); "
                        "resume with the same --data")
    return state


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
    cfg = resolve(argv)
    shape = sorted(cfg.given & ({"preset"} | set(MODEL_FIELDS)))
    if cfg.init_from and shape and not cfg.resume:
        raise UserError(f"--init_from takes the model's shape from the checkpoint; drop {', '.join('--' + k for k in shape)}")
    data = TokenData(cfg.data)
    if cfg.init_from is None:
        cfg.model.vocab_size = data.vocab_size
    cfg.validate()
    data.check_block_size(cfg.block_size)
    if cfg.document_masking and data.meta.get("eos_token_id") is None:
        raise UserError(f"--document_masking needs the EOS id that ends each document; {data.spec} has none in meta.json")
    ckpt = prepare_run_dir(cfg)
    check_trackers(cfg.report_to)

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not torch.cuda.is_available():
        raise UserError("the launch config asks for FSDP, which Accelerate runs only on GPUs (on CPU it fails, or "
                        "trains unsharded without a word); use cpu_ddp.yaml on a CPU")
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        keep_freed_memory()
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=trackers_for(cfg.report_to) or None,
        project_dir=cfg.out,
        step_scheduler_with_optimizer=False,  # we step it once per optimizer step, whatever the world size
        dynamo_backend="inductor" if cfg.compile else None,
    )
    set_seed(cfg.seed)
    run = Path(cfg.out)
    model = build_model(cfg, data)
    data.check_ids_below(cfg.model.vocab_size)
    state: dict[str, Any] = check_resume(ckpt, cfg, data) if ckpt else {}

    if accelerator.is_main_process:
        if cfg.overwrite and not ckpt:
            for name in RUN_FILES:
                shutil.rmtree(run / name, ignore_errors=True) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        for partial in (run / "checkpoints").glob(".partial-*"):  # left by a run killed mid-save
            shutil.rmtree(partial, ignore_errors=True)
        save_json(cfg.to_dict(), run / "config.json")
        if not (run / "tokenizer").exists() and (data.dir / "tokenizer").is_dir():
            shutil.copytree(data.dir / "tokenizer", run / "tokenizer")
    accelerator.wait_for_everyone()

    device_type = accelerator.device.type
    optimizer = build_optimizer(model, cfg, fused=device_type == "cuda")
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if ckpt:
        try:
            accelerator.load_state(str(ckpt))  # safetensors + torch.load(weights_only=True): no code runs
        except (pickle.UnpicklingError, RuntimeError, OSError) as e:
            raise UserError(f"cannot load checkpoint {ckpt} safely ({str(e).splitlines()[0][:200]}); "
                            "resume from another checkpoint") from None
        apply_config_to_schedule(scheduler, cfg)
    start_step = state.get("step", 0)
    tokens_seen = state.get("tokens_seen", 0)
    elapsed_before = state.get("elapsed_s", 0.0)

    world, rank = accelerator.num_processes, accelerator.process_index
    eos = data.meta.get("eos_token_id") if cfg.document_masking else None  # documents end at EOS
    mb, ga, T = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.block_size
    tokens_per_step = mb * T * ga * world
    n_params = sum(p.numel() for p in accelerator.unwrap_model(model).parameters())
    flops_per_token = accelerator.unwrap_model(model).flops_per_token(T)
    mixed = accelerator.mixed_precision
    peak = peak_flops(accelerator.device, mixed, cfg.peak_flops)
    log = RunLog(run / "train_log.jsonl", accelerator.is_main_process)
    if ckpt:
        log.truncate_after(start_step)
    header = {"event": "resume" if ckpt else "run", "step": start_step, "world_size": world,
              "mixed_precision": mixed, "parameters": n_params, "tokens_per_step": tokens_per_step,
              "device": str(accelerator.device), "version": __version__, "config": cfg.to_dict()}
    log.write(header)
    if cfg.report_to != "none":
        accelerator.init_trackers(cfg.project_name, config={k: v for k, v in cfg.to_dict().items() if k != "model"}
                                  | {f"model.{k}": v for k, v in cfg.to_dict()["model"].items()})
    if ckpt and (changed := changes(flatten(state.get("config", {})), cfg)):
        accelerator.print("resuming with " + ", ".join(changed))
    accelerator.print(f"{n_params / 1e6:.2f}M parameters | world size {world} | {PRECISION.get(mixed, mixed)} | "
                      f"{tokens_per_step:,} tokens per step ({mb} x {T} x {ga} accumulation x {world} processes)"
                      + (f" | resuming from {ckpt}" if ckpt else ""))

    def train_state(step: int) -> dict[str, Any]:
        return {"step": step, "tokens_seen": tokens_seen, "data_fingerprint": data.fingerprint(),
                "tokenizer_sha256": data.tokenizer_sha256,
                "data_dir": str(data.dir), "model_config": cfg.to_dict()["model"], "world_size": world,
                "elapsed_s": elapsed_before + time.perf_counter() - t_start, "config": cfg.to_dict()}

    def evaluate(step: int) -> dict[str, float]:
        loss_sum, count = score(model, data.valid, T, mb, cfg.eval_iters * mb, accelerator.device, rank, world, eos)
        m = metrics(accelerator.reduce(loss_sum, "sum").item(), accelerator.reduce(count, "sum").item(),
                    data.bytes_per_token)
        record = {"step": step, "val_loss": m["loss"], "val_ppl": m["perplexity"], "val_bpb": m.get("bits_per_byte")}
        log.write(record)
        accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=step)
        return m

    # The first optimizer step whose gradient norm was not finite (0: none), kept on the device and
    # read only where the loop syncs anyway (log, eval, save): no host sync per step on a GPU.
    bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)
    bad_norm = torch.zeros((), device=accelerator.device)

    def check_finite() -> None:
        if first := int(bad_step):
            raise_nonfinite(log, first, bad_norm, list_checkpoints(run))

    fp16_skips = 0
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
               disable=None if accelerator.is_local_main_process else True)
    t_start = t_last = time.perf_counter()
    tokens_last = tokens_seen
    done = start_step
    model.train()
    with StopRequest() as stop:
        for step in range(start_step, cfg.max_steps):
            # get_batch: this step's windows for this rank, split into micro-batches below.
            batch = host_to_device(step_windows(data.train, mb * ga, T, cfg.seed, step, rank), accelerator.device)
            loss_sum = torch.zeros((), device=accelerator.device)
            lr = optimizer.param_groups[0]["lr"]
            for micro in range(ga):
                xy = batch[micro * mb:(micro + 1) * mb]
                x, y = xy[:, :-1], xy[:, 1:]
                with accelerator.accumulate(model):
                    _, loss = model(x, y, document_mask(x, eos))
                    accelerator.backward(loss)
                    loss_sum += loss.detach()
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
                        if mixed != "fp16":  # under fp16 the scaler skips such steps itself
                            new_bad = (bad_step == 0) & ~torch.isfinite(grad_norm)
                            bad_step = torch.where(new_bad, step + 1, bad_step)
                            bad_norm = torch.where(new_bad, grad_norm.float(), bad_norm)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            if mixed == "fp16":
                fp16_skips = fp16_skips + 1 if accelerator.optimizer_step_was_skipped else 0
                if fp16_skips > 25:
                    raise_nonfinite(log, step + 1, grad_norm, list_checkpoints(run))
            tokens_seen += tokens_per_step
            done = step + 1
            bar.update(1)

            stopping = _agree(accelerator, stop.requested)
            logging = done % cfg.log_interval == 0 or done == 1 or done == cfg.max_steps
            evaluating = done % cfg.eval_interval == 0 or done == cfg.max_steps
            saving = done % cfg.save_interval == 0 or done == cfg.max_steps or stopping
            if logging or evaluating or saving:
                check_finite()
            if logging:
                now = time.perf_counter()
                tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                t_last, tokens_last = now, tokens_seen
                record = {"step": done, "tokens": tokens_seen,
                          "loss": accelerator.reduce(loss_sum / ga, "mean").item(), "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens_per_s": tps,
                          "mfu": flops_per_token * tps / world / peak if peak else None,
                          "elapsed_s": elapsed_before + now - t_start}
                if mixed == "fp16":
                    record["skipped_step"] = accelerator.optimizer_step_was_skipped
                log.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=done)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", refresh=False)
                if bar.disable and accelerator.is_main_process:  # not a terminal (make, CI, SLURM): a plain line
                    eta = (cfg.max_steps - done) * tokens_per_step / max(tps, 1e-9)
                    print(f"step {done}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                          f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", flush=True)
            if evaluating:
                m = evaluate(done)
                if accelerator.is_main_process:
                    bar.write(f"step {done}: val_loss {m['loss']:.4f}, ppl {m['perplexity']:.2f}")
            if saving:
                save_checkpoint(accelerator, run, done, train_state(done), cfg.keep_checkpoints)
            if stopping:
                accelerator.print(f"\nstopped by signal at step {done}; checkpoint saved, continue with --resume")
                break
    bar.close()
    # Replicas must agree after training: a gathered checksum per rank makes that checkable.
    sums = accelerator.gather(torch.tensor([param_checksum(model)], device=accelerator.device, dtype=torch.float64))
    log.write({"event": "end", "step": done, "param_checksums": sums.tolist()})
    accelerator.wait_for_everyone()  # no rank tears down the process group while another still uses it
    accelerator.end_training()
    return 0


def _agree(accelerator, flag: bool) -> bool:
    """True on every rank if any rank was asked to stop, so all save the same step together."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def raise_nonfinite(log: RunLog, step: int, grad_norm: torch.Tensor, ckpt_dir: list[Path]) -> None:
    last = ckpt_dir[-1] if ckpt_dir else None
    log.write({"event": "nonfinite", "step": step, "grad_norm": float(grad_norm)})
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
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
