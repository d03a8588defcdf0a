"""Running the CLIs in-process (fast) and under `accelerate launch` (real multi-process)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--block_size", "32", "--micro_batch_size", "4", "--warmup_steps", "2",
        "--eval_iters", "2", "--log_interval", "1", "--lr", "3e-3", "--mixed_precision", "no"]
TASKS_DIR = ROOT / "tests" / "tasks"
DDP_TASKS = ["hellaswag_local", "winogrande_local", "text_local", "continue_local"]
# conftest's ddp_run: a run of these flags under cpu_ddp.yaml, which other multi-process runs must equal
DDP_RUN = [*TINY, "--max_steps", "6", "--eval_interval", "6", "--save_interval", "3", "--eval_tasks", ",".join(DDP_TASKS),
           "--eval_tasks_interval", "6", "--eval_tasks_limit", "6", "--eval_tasks_dir", str(TASKS_DIR)]
DDP_MUON_RUN = [*TINY, "--eval_interval", "100", "--save_interval", "100", "--max_steps", "4", "--optimizer", "muon",
                "--mixed_precision", "bf16"]  # conftest's ddp_muon_run


def train(*args) -> int:
    """accel_pretrain.train's CLI in this process; Accelerate's singletons are reset afterwards."""
    from accelerate.state import AcceleratorState, GradientState

    from accel_pretrain.errors import run_cli
    from accel_pretrain.train import main

    try:
        return run_cli(main, [str(a) for a in args])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def free_port() -> int:
    """A TCP port nobody listens on now, for a launch's main process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, *args, extra: list[str] | None = None, env: dict[str, str] | None = None,
           module: str = "accel_pretrain.train", **popen) -> subprocess.Popen:
    """`accelerate launch --config_file accelerate_configs/CONFIG -m MODULE ARGS` (train, or a test's
    runner of it)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / config), *(extra or []), "-m", module, *[str(a) for a in args]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def weights(ckpt: Path) -> dict:
    return load_file(str(ckpt / "model.safetensors"))


class Clock:
    """time.time() and time.monotonic() for stopping.Deadline, moved by the test (or a runner)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def compile_through(backend: str) -> None:
    """torch.compile through `backend` from here on (aot_eager: dynamo's graphs and AOT autograd as
    under inductor, without its C++ build), whatever backend the caller names."""
    import torch

    compile_ = torch.compile
    torch.compile = lambda model=None, **kwargs: compile_(model, **{**kwargs, "backend": backend})
