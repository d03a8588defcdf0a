"""What a run does between optimizer steps: log (train_log.jsonl, trackers, the bar or a plain line
with its ETA), evaluate, save, and score --eval_tasks, each when its interval comes; a step-0
baseline; and the stop of a run whose gradients went non-finite."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import torch

from tokenization import tasks

from .checkpoint import list_checkpoints, save_checkpoint
from .config import TrainConfig
from .data import TokenData
from .errors import UserError
from .evaluate import metrics, score
from .run_state import Run, StepResult

SKIP_LIMIT = 25  # fp16: overflowing steps in a row before the run stops


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


def contaminated_tasks(run: Run) -> None:
    """--eval_tasks that the data was found to contain: a warning each, and a train_log.jsonl event."""
    from .downstream import contamination, load_tasks, warn_contaminated

    _, loaded = load_tasks(task_names(run.cfg), run.cfg.eval_tasks_dir)  # groups and tags as their tasks (cached)
    found = contamination(run.cfg.data, list(loaded["tasks"]))
    if found:
        run.log.write({"event": "contaminated", "step": run.start_step, "tasks": found})
        if run.accelerator.is_main_process:
            print("\n".join(warn_contaminated(found)), file=sys.stderr, flush=True)


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
        m = timed(run, "eval", lambda: evaluate_step(run, done))
        if run.accelerator.is_main_process:
            run.bar.write(f"step {done}: val_loss {m['loss']:.4f}, ppl {m['perplexity']:.2f}")
    if saving:
        timed(run, "save", lambda: save_checkpoint(run.accelerator, run.dir, done, train_state(run, done),
                                                   cfg.keep_checkpoints))
        run.deadline.saved(run.costs["save"])
    if scoring and not stopping:  # after the save: a run killed while scoring loses nothing
        timed(run, "tasks", lambda: score_tasks(run, done))


def task_names(cfg: TrainConfig) -> list[str]:
    return tasks.task_list(cfg.eval_tasks)


def score_tasks(run: Run, done: int) -> None:
    """--eval_tasks through lm-eval, each rank scoring a share of the documents; one train_log.jsonl
    line ({"step", "tasks/TASK/METRIC": value, ..., "tasks/core"}) and tracker record. The model
    unwrapped: under DDP or --compile the plain module (no recompilation for the tasks' shapes),
    under FSDP2 the sharded one, which every rank calls as often (lm-eval pads the requests)."""
    from .downstream import flat_metrics, run_tasks
    from .task_lm import TaskLM

    cfg, accelerator = run.cfg, run.accelerator
    model = run.bare_model
    lm = TaskLM(model, run.tokenizer, cfg.micro_batch_size, accelerator.device, accelerator.process_index,
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


def baseline(run: Run) -> None:
    """Validation loss and --eval_tasks at step 0, before the first update: the "before" of a run."""
    started = time.perf_counter()
    m = evaluate_step(run, 0)
    if run.accelerator.is_main_process:
        run.bar.write(f"step 0: val_loss {m['loss']:.4f}, ppl {m['perplexity']:.2f} (before the first update)")
    if run.cfg.eval_tasks:
        score_tasks(run, 0)
    run.paused += time.perf_counter() - started


def log_step(run: Run, result: StepResult, done: int) -> None:
    """One train_log.jsonl line (and tracker record), the bar or a plain line, and the spike watch."""
    cfg, accelerator = run.cfg, run.accelerator
    now = time.perf_counter()
    tps = (run.tokens_seen - run.tokens_last) / max(now - run.t_last - run.paused, 1e-9)  # training time only
    run.t_last, run.tokens_last, run.paused = now, run.tokens_seen, 0.0
    peak = run.peak_flops
    record = {"step": done, "tokens": run.tokens_seen,
              "loss": accelerator.reduce(result.loss_sum / cfg.gradient_accumulation_steps, "mean").item(),
              "lr": result.lr, "grad_norm": result.grad_norm.item(), "tokens_per_s": tps,
              "mfu": run.flops_per_token * tps / accelerator.num_processes / peak if peak else None,
              "elapsed_s": run.state.get("elapsed_s", 0.0) + now - run.t_start}
    if accelerator.scaler is not None:
        record["skipped_step"] = bool(run.skipped)
    if accelerator.device.type == "cuda":  # the allocator's own count: no device sync
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
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
        eta = (cfg.max_steps - done) * run.tokens_per_step / max(tps, 1e-9) + periodic_seconds(run, done)
        print(f"step {done}/{cfg.max_steps} | loss {record['loss']:.4f} | lr {result.lr:.2e} | {tps:,.0f} tok/s | "
              f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", flush=True)


def periodic_seconds(run: Run, done: int) -> float:
    """What the evaluations, saves and task scores still to come will take, at their last measured cost."""
    cfg = run.cfg

    def left(interval: int) -> int:  # steps after `done` that are multiples of interval, or the last step
        return cfg.max_steps // interval - done // interval + (cfg.max_steps % interval != 0)

    intervals = {"eval": cfg.eval_interval, "save": cfg.save_interval,
                 "tasks": cfg.eval_tasks_interval or cfg.save_interval}
    return sum(left(intervals[k]) * seconds for k, seconds in run.costs.items())


def timed(run: Run, what: str, action: Callable[[], Any]) -> Any:
    """Run a periodic action, recording its cost for the ETA and keeping it out of tokens/s."""
    started = time.perf_counter()
    out = action()
    run.costs[what] = time.perf_counter() - started
    run.paused += run.costs[what]
    return out


def evaluate_step(run: Run, done: int) -> dict[str, float]:
    """Validation loss on the fixed windows, each rank scoring its share. The model unwrapped: under
    --compile eager, as `evaluate` scores a checkpoint (the same val_loss), with no second compilation
    for eval mode (on an H200, gpt2-124m's first eval and save took 35 s with one, and the ETA counted
    that for each eval to come)."""
    cfg, accelerator = run.cfg, run.accelerator
    mb = cfg.micro_batch_size
    loss_sum, count = score(run.bare_model, run.data.valid, cfg.block_size, mb, cfg.eval_iters * mb, accelerator.device,
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
            "tokenizer_sha256": data.tokenizer_sha256, "tokenizer_fingerprint": data.tokenizer_fingerprint,
            "tokenizer": data.meta.get("tokenizer"), "data_vocab_size": data.vocab_size,
            "data_dir": str(data.dir), "model_config": cfg.to_dict()["model"],
            "world_size": run.accelerator.num_processes, "elapsed_s": run.elapsed(), "config": cfg.to_dict()}


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
