"""The README's launch commands as a user runs them: under `accelerate launch`, a user mistake gives
our one line and no traceback of ours, accelerate's own noise is silenced where it can be, and Ctrl-C
saves a checkpoint that --resume continues."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from accel_pretrain.checkpoint import list_checkpoints
from tests.helpers import ROOT, TINY, free_port, train
from tests.test_faults import wait_for_step

OUR_FRAME = re.compile(r'File ".*accel_pretrain/')


def documented_launch(config: str, *args, port: int | None = None) -> subprocess.Popen:
    """`accelerate launch -q --num_cpu_threads_per_process N --config_file accelerate_configs/CONFIG -m
    accel_pretrain.train ...` in its own process group, as a terminal runs it (Ctrl-C reaches the group)."""
    extra = ["--main_process_port", str(port)] if port else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_cpu_threads_per_process", "1",
           "--config_file", str(ROOT / "accelerate_configs" / config), *extra, "-m", "accel_pretrain.train",
           *map(str, args)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("config", ["cpu.yaml", "cpu_ddp.yaml"])
def test_user_error_under_launch_is_our_one_line(tmp_path, config):
    proc = documented_launch(config, "--data", tmp_path / "data.txt", "--out", tmp_path / "run",
                             port=free_port())
    (tmp_path / "data.txt").write_text("a corpus, not prepared")
    out, _ = proc.communicate(timeout=120)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --data {tmp_path / 'data.txt'} is a file; data must be prepared first: "
                      f"`python -m tokenization.prepare {tmp_path / 'data.txt'} --out data`, then --data data"], out
    assert proc.returncode == 1, out  # accelerate launch turns any failure of the script into 1
    assert not OUR_FRAME.search(out) and "num_cpu_threads_per_process" not in out, out
    if config == "cpu.yaml":  # -q silences the launcher's CalledProcessError: our line is all there is
        assert out.strip().splitlines() == errors, out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config", ["cpu.yaml", "cpu_ddp.yaml"])
def test_ctrl_c_under_launch_saves_and_resume_continues(tmp_path, data_dir, config, capsys):
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 5000, "--eval_interval", 5000,
            "--save_interval", 5000]
    proc = documented_launch(config, *args, port=free_port())
    wait_for_step(run, 3, proc, timeout=180)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, _ = proc.communicate(timeout=120)
    deadline = time.time() + 60
    while not list_checkpoints(run) and time.time() < deadline:  # a launcher may exit before its child
        time.sleep(0.1)
    assert "stopped by signal" in out and "continue with --resume" in out, out
    assert not OUR_FRAME.search(out), out
    saved = list_checkpoints(run)
    assert len(saved) == 1, out
    step = int(saved[0].name[5:])
    # the resume runs here (under a launch of two ranks: test_shared_runs, and test_cluster's requeue)
    assert train("--out", run, "--resume", "--max_steps", step + 2) == 0
    assert f"resuming with max_steps 5000 -> {step + 2}" in capsys.readouterr().out
    assert list_checkpoints(run)[-1].name == f"step_{step + 2:07d}"
