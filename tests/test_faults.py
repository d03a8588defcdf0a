"""Faults: SIGKILL at random moments, a killed DDP rank, SIGTERM, a full disk, non-finite numbers,
and a tampered checkpoint. Nothing a user had is lost; resume reproduces the uninterrupted run."""
from __future__ import annotations

import errno
import os
import re
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from accel_pretrain.checkpoint import list_checkpoints
from accel_pretrain.tracking import read_log
from tests.helpers import ROOT, TINY, free_port, launch, train, weights

CKPT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", "train_state.json"}


def start(args: list) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "accel_pretrain.train", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_checkpoints_complete(run) -> None:
    for ckpt in list_checkpoints(run):
        assert CKPT_FILES <= {p.name for p in ckpt.iterdir()}, ckpt


def wait_for_step(run, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run / "train_log.jsonl"
        if log.exists() and any(r.get("step", 0) >= step and "loss" in r for r in read_log(log)):
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, data_dir):
    args = ["--data", data_dir, *TINY, "--max_steps", 30, "--eval_interval", 10, "--save_interval", 1,
            "--keep_checkpoints", 2]
    assert train(*args, "--out", tmp_path / "ref") == 0
    reference = weights(tmp_path / "ref/checkpoints/step_0000030")

    run, rng, kills = tmp_path / "run", random.Random(0), 0
    while kills < 4:
        proc = start([*args, "--out", run, "--resume" if list_checkpoints(run) else "--overwrite"])
        wait_for_step(run, 1 + 6 * kills, proc)  # training is under way; saves happen every step
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        assert_checkpoints_complete(run)
    assert kills >= 3
    proc = start([*args, "--out", run, "--resume"])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    resumed = weights(run / "checkpoints/step_0000030")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not list((run / "checkpoints").glob(".partial-*"))


def test_sigterm_saves_current_step_and_resume_continues(tmp_path, data_dir):
    args = ["--data", data_dir, *TINY, "--max_steps", 400, "--eval_interval", 400, "--save_interval", 400,
            "--out", tmp_path / "run"]
    proc = start(args)
    wait_for_step(tmp_path / "run", 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopped by signal" in out
    saved = list_checkpoints(tmp_path / "run")
    assert len(saved) == 1 and 5 <= int(saved[0].name[5:]) < 400
    step = int(saved[0].name[5:])
    assert train(*args, "--resume", "--hidden_size", 128) == 2  # another model shape is refused
    assert train(*args, "--resume", "--max_steps", step + 3) == 0
    assert list_checkpoints(tmp_path / "run")[-1].name == f"step_{step + 3:07d}"
    steps = [r["step"] for r in read_log(tmp_path / "run/train_log.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == step + 3


def test_train_sbatch_gives_the_launcher_more_than_its_default_30_s_and_less_than_term_at_300():
    sbatch = (ROOT / "slurm" / "train.sbatch").read_text()
    timeout = re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT=\$\{TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)\}", sbatch)
    assert "--signal=TERM@300" in sbatch.replace("#SBATCH ", "") and timeout and 30 < int(timeout[1]) < 300


@pytest.mark.parametrize("shutdown_timeout,saved", [(15, True), (1, False)], ids=["save-within", "save-beyond"])
def test_sigterm_to_the_launcher_waits_its_shutdown_timeout_for_the_save(tmp_path, data_dir, shutdown_timeout, saved):
    """`accelerate launch` is torch's elastic agent: it forwards SIGTERM and kills the workers
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later (30 by default). A save that takes 5 s completes within
    a 15 s timeout, and the launcher exits 143 (128 + SIGTERM), as train.sbatch's comment says; under
    a 1 s timeout it is killed half-way and nothing half-written is listed. So the launcher waits the
    exported value, and train.sbatch's (above) gives a large save its time."""
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 3000, "--save_interval", 3000,
            "--eval_interval", 3000]
    proc = launch("cpu_ddp.yaml", *args, extra=["--main_process_port", str(free_port())], module="tests.slow_save",
                  env={"SLOW_SAVE_S": "5", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(shutdown_timeout)})
    wait_for_step(run, 3, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)  # the launcher alone, as srun's signal to the job step reaches it
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 143, out
    assert ("stopped by signal" in out) == saved and len(list_checkpoints(run)) == int(saved), out
    assert_checkpoints_complete(run)


def test_killing_one_ddp_rank_ends_the_job(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 3000, "--save_interval", 5,
            "--eval_interval", 3000]
    proc = launch("cpu_ddp.yaml", *args, extra=["--main_process_port", str(free_port())])
    wait_for_step(run, 6, proc, timeout=180)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "accel_pretrain.train" in " ".join(c.cmdline())]
    assert len(workers) == 2
    workers[1].kill()
    proc.communicate(timeout=120)  # the launcher ends the job (torch's elastic agent sees the dead worker)
    assert proc.returncode != 0
    assert_checkpoints_complete(run)  # what a resume needs (two ranks resuming: test_cluster, test_shared_runs)
    assert train("--out", run, "--resume", "--max_steps", int(list_checkpoints(run)[-1].name[5:]) + 1) == 0
    assert read_log(run / "train_log.jsonl")[-1]["event"] == "end"


def test_full_disk_during_checkpoint_keeps_earlier_ones(tmp_path, data_dir, monkeypatch, capsys):
    from accelerate import Accelerator

    real_save, calls = Accelerator.save_state, []

    def failing_save(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "model.safetensors"), "wb").write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(Accelerator, "save_state", failing_save)
    code = train("--data", data_dir, "--out", run, *TINY, "--max_steps", 6, "--save_interval", 2,
                 "--eval_interval", 6)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and "intact" in err[0]
    assert [p.name for p in list_checkpoints(run)] == ["step_0000002"]
    assert_checkpoints_complete(run)
    assert not list((run / "checkpoints").glob(".partial-*"))
    monkeypatch.setattr(Accelerator, "save_state", real_save)
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 6, "--save_interval", 2,
                 "--eval_interval", 6, "--resume") == 0


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    base = ["--data", data_dir, "--out", run, *TINY, "--eval_interval", 100, "--save_interval", 4]
    assert train(*base, "--max_steps", 4) == 0
    good = (run / "checkpoints/step_0000004/model.safetensors").read_bytes()
    capsys.readouterr()
    # Logging every 5 steps, the bad step 6 is first read at step 8's save: it is still the one named.
    assert train(*base, "--max_steps", 12, "--lr", "1e12", "--log_interval", 5, "--resume") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("warning: resuming with max_steps 4 -> 12 moves the lr of step 5")  # a cosine re-warmed
    err = [line for line in lines if not line.startswith("warning:")]
    assert len(err) == 1 and "non-finite" in err[0] and "step 6" in err[0] and "step_0000004" in err[0]
    assert [p.name for p in list_checkpoints(run)] == ["step_0000004"]
    assert (run / "checkpoints/step_0000004/model.safetensors").read_bytes() == good
    assert read_log(run / "train_log.jsonl")[-1] == {"event": "nonfinite", "step": 6, "grad_norm": pytest.approx(float("nan"), nan_ok=True)}
    assert train(*base, "--max_steps", 8, "--lr", "1e-3", "--resume") == 0
    assert [p.name for p in list_checkpoints(run)][-1] == "step_0000008"


def test_tampered_checkpoint_is_not_unpickled(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    base = ["--data", data_dir, "--out", run, *TINY, "--eval_interval", 100, "--save_interval", 2]
    assert train(*base, "--max_steps", 2) == 0
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Evil()}, run / "checkpoints/step_0000002/optimizer.bin")
    capsys.readouterr()
    assert train(*base, "--max_steps", 4, "--resume") == 2
    assert "cannot load checkpoint" in capsys.readouterr().err
    assert not marker.exists()
