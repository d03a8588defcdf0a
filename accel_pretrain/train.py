"""Pretraining loop. One code path for a laptop CPU, one GPU, DDP, FSDP and several nodes:
only the `accelerate launch` config changes.

    accelerate launch [--config_file accelerate_configs/NAME.yaml] -m accel_pretrain.train \\
        --data DIR --out RUN [--config FILE.yaml] [--preset NAME] [--FIELD VALUE ...]

Reads like the flowchart: get_batch -> model(x) -> cross_entropy -> backward (accumulate) ->
clip_grad_norm_ -> AdamW + schedule -> eval / checkpoint / train_log.jsonl."""
from __future__ import annotations

import math
import os
import pickle
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import MODEL_FIELDS, TrainConfig, changes, flatten, help_text, resolve, resolve_precision, save_json
from .data import TokenData, check_same_tokenizer, step_windows
from .errors import UserError, run_cli
from .launch import leave, process_start, start_accelerator
from .memory import check_memory, out_of_memory_as_user_error
from .model import Transformer, attention_mask
from .optim import apply_config_to_schedule, build_optimizer, build_scheduler, wsd_decay_start
from .periodic import SKIP_LIMIT, baseline, contaminated_tasks, periodic_actions, task_names, task_tokenizer
from .run_state import Run, StepResult
from .rundir import check_resume, check_resume_shape, check_resume_world, check_steps, claim_run_dir, write_run_dir
from .stopping import Deadline, StopRequest, parse_duration
from .tracking import SpikeWatch, check_trackers, read_log

PRECISION = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + gradient scaler"}


def host_to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Pinned memory on CUDA, so the copy runs asynchronously while the GPU works on the last step."""
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def param_checksum(model: torch.nn.Module) -> float:
    """A float64 sum over all weights: equal on every rank exactly when the replicas agree. Under
    FSDP2 a weight is a DTensor whose sum is partial on each rank: full_tensor() adds the shards."""
    sums = (p.detach().double().sum() for p in model.parameters())
    return float(sum(t.full_tensor() if hasattr(t, "full_tensor") else t for t in sums))


def configure(argv: list[str]) -> tuple[TrainConfig, TokenData, str]:
    """The resolved, validated config, its data, and why the precision is what it is."""
    cfg = resolve(argv)
    shape = sorted(cfg.given & ({"preset"} | set(MODEL_FIELDS)))
    if cfg.init_from and shape and not cfg.resume:
        raise UserError(f"--init_from takes the model's shape from the checkpoint; drop {', '.join('--' + k for k in shape)}")
    data = TokenData(cfg.data)
    if cfg.init_from is None:
        cfg.model.vocab_size = data.vocab_size
    if cfg.eval_at_start is None:
        cfg.eval_at_start = bool(cfg.init_from)
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


def wants_decay(run: Run, done: int) -> bool:
    """--time_limit with a WSD schedule whose decay has not begun: whether the time left is down to
    decay_fraction of the run's, when the decay must start for the run to end decayed."""
    cfg = run.cfg
    return (cfg.lr_schedule == "wsd" and run.decay_from is None and done < wsd_decay_start(cfg)
            and run.deadline.decay_due(cfg.decay_fraction, run.state.get("elapsed_s", 0.0)))


def start_decay(run: Run, done: int) -> None:
    """Begin the WSD decay now and end it (max_steps) where the slowest recent step says the time
    left runs out, with a tenth of it to spare; config.json and later checkpoints carry the new
    max_steps and decay_start, so a resume continues the same decay."""
    cfg, deadline = run.cfg, run.deadline
    if run.decay_from is not None or done >= wsd_decay_start(cfg):
        return
    left = deadline.left()
    steps = max(1, int(0.9 * left / max(max(deadline.steps, default=1.0), 1e-6)))
    if run.accelerator.num_processes > 1:  # each rank's clock and steps differ: all take the fewest
        import torch.distributed as dist

        agreed = torch.tensor([steps], device=run.accelerator.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        steps = int(agreed.item())
    run.decay_from = done
    if done + steps >= cfg.max_steps:
        return  # the schedule as given ends before the limit
    cfg.max_steps, cfg.decay_start = done + steps, done
    run.bar.total = cfg.max_steps
    run.log.write({"event": "decay", "step": done, "max_steps": cfg.max_steps, "why": "time_limit"})
    if run.accelerator.is_main_process:
        save_json(cfg.to_dict() | data_mixture(run.data), run.dir / "config.json")
        run.bar.write(f"time limit: the WSD decay starts at step {done} and ends at step {cfg.max_steps}, "
                      f"about {left:.0f} s from now, before the limit")


def data_mixture(data: TokenData) -> dict[str, Any]:
    """For config.json: the weights a mixture is drawn with, normalised to sum to 1."""
    return {"data_mixture": {path: w for path, w in data.sources}} if len(data.sources) > 1 else {}


def mixture_line(data: TokenData) -> str:
    given = data.given_weights
    line = "data mixture: " + ", ".join(f"{path} {w:.1%}" for path, w in data.sources)
    if abs(sum(given) - 1) > 1e-9:
        line += f" (the weights given sum to {sum(given):g}; each is divided by that)"
    return line


def build_model(cfg: TrainConfig, data: TokenData) -> Transformer:
    """A fresh model of cfg.model, or --init_from's weights: a Hugging Face model, or a run or
    checkpoint of ours (weights only: the optimizer and schedule start anew on the data given)."""
    if cfg.init_from:
        from .checkpoint import load_any

        model, tokenizer, _ = load_any(cfg.init_from)
        check_same_tokenizer(data, tokenizer, "the --init_from model")
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
        if done == 0 and cfg.eval_at_start:
            baseline(run)
        run.model.train()
        while done < run.cfg.max_steps:  # a time-limited WSD run may bring max_steps forward
            batch = get_batch(run, done)
            result = optimizer_step(run, batch, done)
            done += 1
            run.deadline.step_done()
            stopping, decaying = run.vote(stop.requested or run.deadline.due(), wants_decay(run, done))
            if decaying:
                start_decay(run, done)
            periodic_actions(run, result, done, stopping)
            if stopping:
                why = ("by signal" if stop.requested else "before the time limit" if run.deadline.due()
                       else "because another process was asked to")
                run.accelerator.print(f"\nstopped {why} at step {done}; checkpoint saved, continue with --resume")
                break
        finish(run, done)
    return 0


def setup(cfg: TrainConfig, data: TokenData, precision_why: str, held: ExitStack) -> Run | None:
    """Run directory, model, optimizer and log, checked in the order that writes nothing before
    every check has passed; None when a resumed run is already complete. `held` keeps the run
    directory's lock until the run ends."""
    check_trackers(cfg.report_to)
    accelerator = start_accelerator(cfg)
    ckpt, state = claim_run_dir(cfg, accelerator, held)
    if ckpt:
        check_resume(ckpt, state, cfg, data, shape=not cfg.init_from)  # an --init_from run's: once it is loaded
        check_resume_world(ckpt, state, accelerator.num_processes)
        if not check_steps(cfg, ckpt, state):
            return None
        accelerator.print(f"resuming from {ckpt}: loading the model, optimizer and schedule")
    model = build_model(cfg, data)
    model.checkpoint_blocks = cfg.activation_checkpointing
    data.check_ids_below(cfg.model.vocab_size)
    if ckpt and cfg.init_from:
        check_resume_shape(ckpt, state, cfg)
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
    run = Run(cfg, data, accelerator, model, optimizer, scheduler, state, tokenizer,
              Deadline(cfg.time_limit, checkpoint_bytes(model), process_start()))
    open_log(run, ckpt, precision_why)
    return run


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """This process's bytes of a checkpoint: weights and AdamW's two moments (Muon's one is smaller)."""
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def open_log(run: Run, ckpt: Path | None, precision_why: str) -> None:
    """train_log.jsonl's header (after dropping lines a resume redoes), trackers, the banner, the bar."""
    from tqdm.auto import tqdm

    cfg, accelerator, data = run.cfg, run.accelerator, run.data
    world, mixed = accelerator.num_processes, accelerator.mixed_precision
    mb, ga, T = cfg.micro_batch_size, cfg.gradient_accumulation_steps, cfg.block_size
    n_params = sum(p.numel() for p in run.bare_model.parameters())
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
    if cfg.time_limit and cfg.lr_schedule == "cosine" and accelerator.is_main_process:
        print(f"warning: --time_limit with the cosine schedule, which is sized for --max_steps {cfg.max_steps}: a run "
              "the limit stops before that ends undecayed; --lr_schedule wsd starts its decay in time to end decayed",
              file=sys.stderr, flush=True)
    if cfg.init_from and not ckpt and "lr" not in cfg.given:
        accelerator.print(f"note: --init_from with the from-scratch peak lr {cfg.lr:g}, which makes a trained model "
                          "forget first; README (Your model, your data) suggests --lr 1e-4 and a short warmup")
    if cfg.eval_tasks:
        contaminated_tasks(run)
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


if __name__ == "__main__":
    leave(run_cli(main))
