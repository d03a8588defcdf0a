"""A run directory shared by ranks and by jobs, and the ends a cluster puts to a job: one job at a
time per --out (a lock naming the holder), rank 0 alone deciding where a run starts, a time limit
the trainer obeys itself, SLURM's port per job, and fp16 overflow seen as the gradient scaler sees it."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from accel_pretrain.checkpoint import list_checkpoints
from accel_pretrain.stopping import parse_duration
from accel_pretrain.tracking import read_log
from tests.helpers import ROOT, TINY, Clock, free_port, launch, train, weights

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}



def test_two_jobs_on_one_out_the_second_is_refused_and_the_first_ends_as_alone(tmp_path, data_dir):
    """A requeued job overlapping its predecessor, or the same sbatch twice: both `--resume auto` on
    one --out, started at once. One trains; the other refuses with one line naming the holder's
    host and pid, and the run ends bit-identical to the same run alone."""
    args = ["--data", data_dir, *TINY, "--max_steps", 300, "--eval_interval", 100, "--save_interval", 100,
            "--log_interval", 50, "--resume", "auto"]
    run = tmp_path / "run"
    assert train(*args, "--out", tmp_path / "alone") == 0  # here, with this process's threads, as the two below
    cmd = [sys.executable, "-m", "accel_pretrain.train", *map(str, args), "--out", str(run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    refused = [(p, err) for p, _, err in results if p.returncode == 2]
    assert len(refused) == 1 and sorted(p.returncode for p in procs) == [0, 2], results
    winner = next(p for p in procs if p.returncode == 0)
    line = refused[0][1].strip()
    assert re.fullmatch(rf"error: {re.escape(str(run))} is in use by another run \(host {re.escape(socket.gethostname())}, "
                        rf"pid {winner.pid}, since [\d:\- ]+\); wait for it to end, or choose another --out \(if that job is gone.*", line), line
    a, b = weights(list_checkpoints(tmp_path / "alone")[-1]), weights(list_checkpoints(run)[-1])
    assert list_checkpoints(run)[-1].name == "step_0000300" and all(torch.equal(a[k], b[k]) for k in a)
    assert [r for r in read_log(run / "train_log.jsonl") if r.get("event") in ("run", "resume")][0]["event"] == "run"


def test_a_refused_start_leaves_no_lock_behind(tmp_path, data_dir):
    """A start refused before it writes anything removes the lock file and the directory it made."""
    assert train("--data", data_dir, "--out", tmp_path / "new", *TINY, "--resume", "latest") == 2
    assert not (tmp_path / "new").exists()
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # someone's folder, not a run of ours
    assert train("--data", data_dir, "--out", folder, *TINY) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]


def test_rank_0_decides_where_the_run_starts(tmp_path, ddp_run):
    """Rank 1 sees no checkpoint (a filesystem that lags); rank 0 sees step 3 (a copy of conftest's
    ddp_run without its step 6). Both resume from 3, and step 6 is ddp_run's to the bit."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    shutil.rmtree(run / "checkpoints/step_0000006")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
           "-m", "tests.lagging_fs", "--out", str(run), "--resume", "auto", "--eval_tasks", "none"]
    lagging = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert lagging.returncode == 0, lagging.stdout + lagging.stderr
    log = read_log(run / "train_log.jsonl")
    assert [r["step"] for r in log if r.get("event") == "resume"] == [3]
    end = [r for r in log if r.get("event") == "end"][-1]
    assert end["step"] == 6 and end["param_checksums"][0] == end["param_checksums"][1]
    ours, plain = weights(run / "checkpoints/step_0000006"), weights(ddp_run / "checkpoints/step_0000006")
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


@pytest.mark.parametrize("text, seconds", [("3600", 3600), ("90m", 5400), ("1.5h", 5400), ("23:55:00", 86100),
                                           ("1-12:00:00", 129600), ("45s", 45)])
def test_time_limits_in_every_form(text, seconds):
    assert parse_duration(text) == seconds


def test_a_bad_time_limit_is_one_line(tmp_path, data_dir, capsys):
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, "--time_limit", "soon") == 2
    assert capsys.readouterr().err.strip() == ("error: time_limit must be seconds, a number with s/m/h/d, or "
                                               "[D-]HH:MM:SS (got 'soon')")
    assert not (tmp_path / "run").exists()


def steps_until_due(deadline, clock: Clock, step_s: float, save_every: int = 0, save_s: float = 0.0) -> int:
    """Run the loop's decision as train.main does: a step, step_done(), due(); returns the step that stops."""
    for step in range(1, 10_000):
        clock.now += step_s
        if save_every and step % save_every == 0:
            clock.now += save_s
            deadline.saved(save_s)
        deadline.step_done()
        if deadline.due():
            return step
    raise AssertionError("never due")


@pytest.mark.parametrize("source", ["--time_limit", "SLURM_JOB_END_TIME"])
def test_the_stop_comes_when_two_steps_two_saves_and_30_s_no_longer_fit(monkeypatch, source):
    """The stopping decision on an injected clock: --time_limit counts from the process start (imports
    included), SLURM_JOB_END_TIME is the job's end, the earlier end wins; the margin is twice the slowest
    of the last 8 steps, twice the last save (before any: the state's bytes at 200 MB/s) and 30 s."""
    from accel_pretrain import stopping

    clock = Clock(1_000_000.0)
    monkeypatch.setattr(stopping, "time", clock)
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    if source == "--time_limit":
        deadline = stopping.Deadline("2m", state_bytes=400_000_000, start=clock.now - 20)  # started 20 s ago
    else:
        monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(clock.now) + 100))
        deadline = stopping.Deadline("1d", state_bytes=400_000_000, start=clock.now)
    assert deadline.end == clock.now + 100
    # 1 s steps, no save yet (2 s estimated): due once now + 2 + 4 + 30 >= end, at 64 s
    assert steps_until_due(deadline, clock, 1.0) == 64


def test_a_slow_step_or_a_slow_save_moves_the_stop_earlier(monkeypatch):
    from accel_pretrain import stopping

    monkeypatch.setattr(stopping, "time", clock := Clock(0.0))
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert stopping.Deadline(None, 10 ** 12).due() is False  # no limit: never due
    assert steps_until_due(stopping.Deadline("100", 0, start=0.0), clock, 1.0) == 68  # 68 + 2 x 1 + 30 >= 100
    clock.now = 0.0  # every 10th step also saves for 6 s: that step took 7 s, so 2 x 7 + 2 x 6 + 30 = 56 s
    assert steps_until_due(stopping.Deadline("100", 0, start=0.0), clock, 1.0, save_every=10, save_s=6.0) == 30
    assert clock.now == 48.0  # 41 s at step 29: 41 + 56 < 100
    clock.now = 0.0
    deadline = stopping.Deadline("100", 0, start=0.0)
    for step_s in (1.0, 1.0, 1.0, 1.0, 1.0, 20.0):  # one step took 20 s: the next two may as well
        clock.now += step_s
        deadline.step_done()
    assert not deadline.due()  # 25 + 2 x 20 + 30 < 100
    clock.now = 31.0
    assert deadline.due()  # 31 + 70 >= 100, where 1 s steps alone would leave 37 s to go
    deadline.saved(0.01)  # the stop's save was quick, and the slow step is long gone from the last 8:
    deadline.steps = [1.0]
    assert deadline.due()  # the decision stands (the stop message names it: the time limit)


def test_a_time_limited_wsd_run_starts_its_decay_in_time_to_end_decayed(tmp_path, data_dir, monkeypatch, capsys):
    """On an injected clock (1 s per step, a 200 s --time_limit, a 32 s stop margin): the decay starts
    when the time left before the stop is down to decay_fraction (0.2) of the run's, at step 128, and
    ends at 90% of the remaining 40 s of steps, step 163, before the stop (step 168): the run ends
    complete and decayed, and config.json and the checkpoint carry the plan. With cosine, a warning."""
    from accel_pretrain import stopping
    from accel_pretrain import train as train_module

    clock = Clock(1_000_000.0)
    monkeypatch.setattr(stopping, "time", clock)
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    monkeypatch.setattr(train_module, "process_start", lambda: clock.now)
    get_batch = train_module.get_batch

    def one_second_steps(run, step):  # noqa: ANN001, ANN202
        clock.now += 1.0
        return get_batch(run, step)

    monkeypatch.setattr(train_module, "get_batch", one_second_steps)
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 10 ** 6, "--eval_interval", 10 ** 6,
                 "--save_interval", 10 ** 6, "--log_interval", 1, "--lr_schedule", "wsd", "--time_limit", "200") == 0
    out = capsys.readouterr()
    assert "time limit: the WSD decay starts at step 128 and ends at step 163" in out.out and "stopped" not in out.out
    log = read_log(run / "train_log.jsonl")
    assert [r for r in log if r.get("event") == "decay"] == [{"event": "decay", "step": 128, "max_steps": 163,
                                                              "why": "time_limit"}]
    lrs = [r["lr"] for r in log if "lr" in r]
    assert len(lrs) == 163 and lrs[2:129] == [3e-3] * 127  # warmup 2, then constant to step 128
    assert all(a > b for a, b in zip(lrs[128:], lrs[129:])) and lrs[-1] == pytest.approx(3e-4 + 2.7e-3 / 35)
    assert [r["step"] for r in log if r.get("event") == "end"] == [163]
    config = json.loads((run / "config.json").read_text())
    assert (config["max_steps"], config["decay_start"]) == (163, 128)
    assert list_checkpoints(run)[-1].name == "step_0000163"

    assert train("--data", data_dir, "--out", tmp_path / "cosine", *TINY, "--max_steps", 1, "--time_limit", "1h") == 0
    assert ("warning: --time_limit with the cosine schedule, which is sized for --max_steps 1: a run the limit stops "
            "before that ends undecayed") in capsys.readouterr().err


def test_ranks_with_other_clocks_agree_on_the_decay_and_end_together(tmp_path, data_dir):
    """Two DDP ranks whose steps take 1 s and 1.5 s of their injected clocks (tests/clocked.py): the
    slower rank asks for the decay first (step 85, agreed a step later, at 86), and its estimate of
    the steps left, the fewer, is the one both ranks take: both end at step 108, decayed, identical."""
    run = tmp_path / "run"
    proc = launch("cpu_ddp.yaml", "--data", data_dir, "--out", run, *TINY, "--max_steps", 10 ** 6,
                  "--eval_interval", 10 ** 6, "--save_interval", 10 ** 6, "--log_interval", 50,
                  "--lr_schedule", "wsd", "--time_limit", "200", extra=["--main_process_port", str(free_port())],
                  module="tests.clocked", env={"SLURM_JOB_END_TIME": ""})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    log = read_log(run / "train_log.jsonl")
    assert [r for r in log if r.get("event") == "decay"] == [{"event": "decay", "step": 86, "max_steps": 108,
                                                              "why": "time_limit"}], out
    end = log[-1]
    assert end["event"] == "end" and end["step"] == 108 and end["param_checksums"][0] == end["param_checksums"][1]


def test_a_time_limited_job_saves_and_stops_before_its_end(tmp_path, data_dir, monkeypatch, capsys):
    """End to end, no signal: a job whose SLURM end is 36 s away (and a --time_limit of a day: the
    earlier end counts) stops by itself, saved, at least the 30 s margin before its end. Nothing here
    depends on how fast this machine is, as long as a step and a save take less than that margin."""
    end = int(time.time()) + 36
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(end))
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 10 ** 6, "--eval_interval", 10 ** 6,
                 "--save_interval", 10 ** 6, "--log_interval", 100, "--time_limit", "1d") == 0
    assert time.time() < end - 10
    out = capsys.readouterr().out
    stopped = re.search(r"stopped before the time limit at step (\d+); checkpoint saved", out)
    assert stopped, out
    step = int(stopped[1])
    assert list_checkpoints(run)[-1].name == f"step_{step:07d}" and step >= 1
    assert [r["step"] for r in read_log(run / "train_log.jsonl") if r.get("event") == "end"] == [step]


def test_launch_node_takes_its_port_from_the_job_id(tmp_path):
    """Two jobs on one node must not both listen on 29500: without MAIN_PORT the port is 20000 plus
    the job id modulo 10000 (below Linux's ephemeral ports, 32768 and up)."""
    stub = tmp_path / "accelerate"
    stub.write_text("#!/bin/bash\necho \"$@\"\n")
    stub.chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_NODEID": "0", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "1234567", "MAIN_ADDR": "10.0.0.1", "GPUS_PER_NODE": "4"}
    out = subprocess.run(["bash", "slurm/launch_node.sh", "--out", "x"], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "--main_process_port 24567 " in out and "--num_processes 8 --machine_rank 0" in out
    env["MAIN_PORT"] = "31000"
    out = subprocess.run(["bash", "slurm/launch_node.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "--main_process_port 31000 " in out


@pytest.mark.parametrize("fused", [True, False])
def test_fp16_overflow_is_seen_through_the_scale_and_stops_the_run(tmp_path, data_dir, monkeypatch, capsys, fused):
    """Accelerate's fp16 path (its GradScaler, here torch.amp.GradScaler("cpu"), and fp16 autocast),
    with AdamW fused as on a GPU (the scaler hands it found_inf and it skips the step inside, so
    Accelerate's optimizer_step_was_skipped stays False) and unfused: from step 4 every gradient is
    inf. Steps 4 on are logged as skipped, the weights do not move, and after 25 skipped steps in a
    row the run stops with one line."""
    from accel_pretrain import train as train_module

    start, build_optimizer, build_model = (train_module.start_accelerator, train_module.build_optimizer,
                                           train_module.build_model)
    seen = {}

    def fp16_accelerator(cfg):  # noqa: ANN001, ANN202
        accelerator = start(cfg)  # Accelerate refuses fp16 on a CPU; its state is set as on a GPU
        accelerator.state._mixed_precision = "fp16"
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu")
        seen["accelerator"] = accelerator
        return accelerator

    def poisoned(cfg, data):  # noqa: ANN001, ANN202
        model = build_model(cfg, data)
        calls = [0]

        def inf_from_step_4(grad: torch.Tensor) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 4:  # the weights as step 3 left them
                seen["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return grad * math.inf if calls[0] > 3 else grad
        model.norm.weight.register_hook(inf_from_step_4)
        seen["model"] = model
        return model

    monkeypatch.setattr(train_module, "start_accelerator", fp16_accelerator)
    monkeypatch.setattr(train_module, "build_optimizer", lambda m, c, **_: build_optimizer(m, c, fused=fused))
    monkeypatch.setattr(train_module, "build_model", poisoned)
    run = tmp_path / "run"
    code = train("--data", data_dir, "--out", run, *TINY, "--max_steps", 100, "--eval_interval", 100,
                 "--save_interval", 100)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: fp16: the gradients overflowed on 26 steps in a row (the gradient scaler "
                                 "skipped them) up to step 29; stopped without saving (no checkpoint was written "
                                 "yet); --resume with a lower --lr, or train in bf16"], err
    log = read_log(run / "train_log.jsonl")
    assert [r["skipped_step"] for r in log if "loss" in r] == [False] * 3 + [True] * 25  # step 29 stops, unlogged
    assert log[-1]["event"] == "nonfinite" and log[-1]["step"] == 29
    after = seen["model"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["before"].items())
    assert seen["accelerator"].optimizer_step_was_skipped is not fused  # what Accelerate alone would report
    assert seen["accelerator"].scaler.get_scale() == 2.0 ** 16 / 2 ** 26
