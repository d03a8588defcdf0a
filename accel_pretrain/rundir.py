"""The run directory: who may write it, where a run starts, and its first files.

One job at a time: rank 0 holds an exclusive lock on RUN/.lock for the whole run (a POSIX lock,
which the kernel drops when the process dies, and which NFS and Lustre with `flock` honour across
machines), so a requeued job that overlaps its predecessor, or a second sbatch of the same command,
is refused with one line naming the holder instead of deleting its partial checkpoints and
rewriting its log. Rank 0 alone decides where the run starts and broadcasts it: ranks on a
filesystem that lags would otherwise see different latest checkpoints."""
from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .checkpoint import FSDP_SHARDED_DIR, checkpoint_step, list_checkpoints, read_state, resolve_checkpoint
from .config import TRAIN_FIELDS, TrainConfig, model_config_from_dict, save_json
from .data import TokenData, same_tokenizer
from .errors import UserError
from .hf import ORIGIN
from .optim import lr_at, wsd_decay_start
from .tracking import read_log

RUN_FILES = ("config.json", "train_log.jsonl", "checkpoints", "tokenizer", ORIGIN)
LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on RUN/.lock, held from before the run directory is read until the process
    ends. The file keeps the holder's host, pid and start time for the refusal of the next one. A
    failed start removes the lock file (and the directory) it created."""

    def __init__(self, run: Path) -> None:
        self.run, self.fd, self.created, self.new_file = Path(run), None, False, False

    def __enter__(self) -> "RunLock":
        self.created = not self.run.exists()
        try:
            self.run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the run directory {self.run} ({e.strerror or e})") from None
        path = self.run / LOCK_FILE
        self.new_file = not path.exists()
        while self.fd is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write the run directory {self.run} ({e.strerror or e})") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise UserError(f"{self.run} is in use by another run ({holder or 'holder unknown'}); wait for "
                                    f"it to end, or choose another --out (if that job is gone, e.g. its node crashed "
                                    f"and the filesystem kept its lock, remove {path})") from None
                print(f"warning: the filesystem of {self.run} does not support locks ({e.strerror}); nothing stops "
                      "a second job from writing the same run", file=sys.stderr, flush=True)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed by a failed start meanwhile: lock the file that is there now
                os.close(fd)
                continue
            self.fd = fd
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        return self

    def __exit__(self, exc_type: type | None, *exc: Any) -> None:
        if self.fd is None:
            return
        if exc_type is not None and self.new_file:  # a run that fails leaves no lock file of its own behind
            (self.run / LOCK_FILE).unlink(missing_ok=True)  # unlinked while locked: a waiting start locks anew
            if self.created and not any(self.run.iterdir()):
                self.run.rmdir()
        os.close(self.fd)  # releases the lock
        self.fd = None


def claim_run_dir(cfg: TrainConfig, accelerator, held: ExitStack) -> tuple[Path | None, dict[str, Any]]:
    """Rank 0 takes the run's lock (kept in `held` until the run ends) and decides where the run
    starts; every rank gets the same decision, or the same error. Returns the checkpoint to resume
    from (None: a fresh start) and its train state."""
    from accelerate.utils import broadcast_object_list

    decision: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            held.enter_context(RunLock(Path(cfg.out)))
            ckpt = prepare_run_dir(cfg)
            decision = [{"ckpt": str(ckpt) if ckpt else None, "state": read_state(ckpt) if ckpt else {},
                         "resume": cfg.resume, "overwrite": cfg.overwrite}]
        except UserError as e:
            decision = [{"error": str(e)}]
        except Exception as e:  # the other ranks must not wait in the broadcast for a decision that never comes
            if accelerator.num_processes > 1:
                broadcast_object_list([{"error": f"rank 0 failed to open the run directory ({e!r})"}])
            raise
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    if "error" in decision[0]:
        raise UserError(decision[0]["error"])
    cfg.resume, cfg.overwrite = decision[0]["resume"], decision[0]["overwrite"]
    return (Path(decision[0]["ckpt"]) if decision[0]["ckpt"] else None), decision[0]["state"]


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
    if has_run and not cfg.overwrite and not list_checkpoints(run) and started_but_no_step(run):
        cfg.overwrite = True  # our run that ended before its first optimizer step (a failed start): nothing to lose
        return None
    if has_run and not cfg.overwrite:
        if not list_checkpoints(run):
            raise UserError(f"{run} holds a run that stopped before its first checkpoint; pass --overwrite to start "
                            "over, or choose another --out")
        raise UserError(f"{run} already holds a run; pass --resume to continue it or --overwrite to start over")
    return None


def started_but_no_step(run: Path) -> bool:
    """Whether RUN holds a run of ours (train_log.jsonl opening with our header) that logged no
    optimizer step (step 1 is always logged): a start that failed, e.g. out of memory or killed."""
    path = run / "train_log.jsonl"
    records = [r for r in read_log(path) if isinstance(r, dict)] if path.is_file() else []
    return bool(records) and records[0].get("event") == "run" and not any("loss" in r for r in records)


def check_steps(cfg: TrainConfig, ckpt: Path, state: dict[str, Any]) -> bool:
    """For a resume: False when the checkpoint is already at max_steps (nothing to do: a requeued
    job that finished, or a resume without a larger --max_steps), after refusing a --max_steps
    below the checkpoint's step, which would rewrite the run's record for nothing."""
    step = int(state.get("step", 0))
    if cfg.max_steps > step:
        warn_wsd_rewarm(cfg, ckpt, state) or warn_lr_jump(cfg, state)
        return True
    if cfg.max_steps < step:
        raise UserError(f"--max_steps {cfg.max_steps} is below step {step} of {ckpt}; nothing changed "
                        f"(pass a --max_steps above {step} to extend the run)")
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run complete at step {step}; raise --max_steps to extend it", flush=True)
    return False


def trained_config(saved: dict[str, Any], **override: Any) -> TrainConfig:
    """The training fields a checkpoint recorded (its schedule), with `override` on top."""
    return TrainConfig(**{k: v for k, v in saved.items() if k in TRAIN_FIELDS} | override)


def warn_lr_jump(cfg: TrainConfig, state: dict[str, Any]) -> bool:
    """A resume whose new schedule shape (another --max_steps, --warmup_steps, schedule...) moves the
    next step's lr by more than half from where the run's own schedule had it: say so before anything
    is written. A new --lr or --min_lr is the user's own choice (e.g. lower after a divergence)."""
    saved = state.get("config") or {}
    step = int(state.get("step", 0))
    if not saved or int(os.environ.get("RANK", "0")) != 0:
        return False
    before = trained_config(saved, lr=cfg.lr, min_lr=cfg.min_lr)
    was, now = lr_at(step, before), lr_at(step, cfg)
    if min(was, now) * 1.5 >= max(was, now):
        return False
    changed = [f"{k} {saved[k]} -> {getattr(cfg, k)}" for k in ("max_steps", "warmup_steps", "lr_schedule",
               "decay_fraction", "decay_shape", "decay_start") if k in saved and saved[k] != getattr(cfg, k)]
    print(f"warning: resuming with {', '.join(changed)} moves the lr of step {step + 1} from {was:.2e} (the run's "
          f"schedule) to {now:.2e} at once: the {cfg.lr_schedule} schedule follows --max_steps; to keep the lr "
          "continuous, resume with the run's --max_steps, or with --lr_schedule wsd from before its decay",
          file=sys.stderr, flush=True)
    return True


def warn_wsd_rewarm(cfg: TrainConfig, ckpt: Path, state: dict[str, Any]) -> bool:
    """Extending a WSD run from inside its decay would send the lr from the decayed value back up
    to the peak: say so, and name the way around it, before anything is written."""
    saved = state.get("config") or {}
    step = int(state.get("step", 0))
    if cfg.lr_schedule != "wsd" or saved.get("lr_schedule") != "wsd" or saved.get("max_steps", 0) >= cfg.max_steps:
        return False
    before = trained_config(saved)
    start = wsd_decay_start(before)
    was, now = lr_at(step - 1, before), lr_at(step, cfg)
    if step <= start or now <= was * 1.01 or int(os.environ.get("RANK", "0")) != 0:
        return False
    earlier = [c for c in list_checkpoints(ckpt.parent.parent) if checkpoint_step(c) <= start]
    where = f"--resume {earlier[-1]}" if earlier else "a checkpoint from before it (none is kept)"
    print(f"warning: {ckpt.name} is inside this WSD run's decay (it began at step {start} of {saved['max_steps']}); "
          f"extending to --max_steps {cfg.max_steps} sends the lr from {was:.2e} back up to {now:.2e}. To extend "
          f"without the jump, restart the decay from {where}, or continue at the decayed lr with --lr {was:g} "
          f"--min_lr {min(cfg.min_lr, was):g}",
          file=sys.stderr, flush=True)
    return True


def write_run_dir(cfg: TrainConfig, data: TokenData, accelerator, fresh: bool, extra: dict[str, Any]) -> None:
    """The main process clears a run being overwritten, drops half-written checkpoints, and writes
    config.json and the tokenizer; the others wait for it."""
    run = Path(cfg.out)
    if accelerator.is_main_process:
        if cfg.overwrite and fresh:
            for name in RUN_FILES:
                shutil.rmtree(run / name, ignore_errors=True) if (run / name).is_dir() else (run / name).unlink(missing_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        for partial in (run / "checkpoints").glob(".partial-*"):  # left by a run killed mid-save
            shutil.rmtree(partial, ignore_errors=True)
        save_json(cfg.to_dict() | extra, run / "config.json")
        if not (run / "tokenizer").exists() and (data.dir / "tokenizer").is_dir():
            shutil.copytree(data.dir / "tokenizer", run / "tokenizer")
        if cfg.init_from and fresh:
            from .hf import save_origin

            save_origin(cfg.init_from, run / ORIGIN)
    accelerator.wait_for_everyone()


def check_resume(ckpt: Path, state: dict[str, Any], cfg: TrainConfig, data: TokenData, shape: bool = True) -> None:
    """The checkpoint's data (and, with shape, model shape) must be this run's; checked before a
    complete run says so, so a conflicting resume is refused whatever the run's state."""
    if state.get("data_fingerprint") != data.fingerprint():
        if other_tokenizer(state, data):
            tok = ckpt.parent.parent / "tokenizer"
            raise UserError(f"cannot resume {ckpt}: it was trained on data of another tokenizer "
                            f"({state.get('tokenizer') or 'unnamed'}, vocabulary {state.get('data_vocab_size', '?')}) "
                            f"than {data.spec} ({data.meta.get('tokenizer')}, vocabulary {data.vocab_size}); a run "
                            f"keeps its tokenizer: prepare the data with --tokenizer {tok}")
        raise UserError(f"cannot resume {ckpt}: it was trained on other data ({state.get('data_dir')}); "
                        "resume with the same --data")
    if shape:
        check_resume_shape(ckpt, state, cfg)


def check_resume_world(ckpt: Path, state: dict[str, Any], world: int) -> None:
    """FSDP's sharded checkpoints resume on the number of processes that wrote them."""
    saved = state.get("world_size")
    if (ckpt / FSDP_SHARDED_DIR).is_dir() and saved != world:
        raise UserError(f"cannot resume {ckpt} on {world} process{'es' if world > 1 else ''}: its FSDP shards were "
                        f"written by {saved}; resume with {saved}, or start a new run from its weights with "
                        f"--init_from {ckpt}")


def check_resume_shape(ckpt: Path, state: dict[str, Any], cfg: TrainConfig) -> None:
    saved = asdict(model_config_from_dict(state["model_config"]))  # fields it predates take their defaults
    diffs = [f"{k} {saved[k]} -> {v}" for k, v in cfg.to_dict()["model"].items()
             if k != "initializer_range" and saved[k] != v]
    if diffs:
        raise UserError(f"cannot resume {ckpt}: the model shape differs ({', '.join(diffs)})")


def other_tokenizer(state: dict[str, Any], data: TokenData) -> bool:
    """Whether the checkpoint's data came from another tokenizer, by the rule that joins the sources
    of a run (data.same_tokenizer); checkpoints that predate data_vocab_size give the model's."""
    trained = {"tokenizer_fingerprint": state.get("tokenizer_fingerprint"),
               "tokenizer_sha256": state.get("tokenizer_sha256"),
               "vocab_size": state.get("data_vocab_size", state.get("model_config", {}).get("vocab_size"))}
    return not same_tokenizer(trained, data.meta)
