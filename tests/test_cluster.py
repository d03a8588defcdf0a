"""Paths that production hardware takes, exercised on CPU: the SLURM script as two local "nodes",
and the GPU-only code (fused AdamW, pinned transfers, the peak-FLOPs table, MFU) through its
CPU-safe parts, so a typo there cannot hide until a GPU run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from accel_pretrain.config import ModelConfig, TrainConfig
from accel_pretrain.model import Transformer
from accel_pretrain.optim import build_optimizer
from accel_pretrain.tracking import peak_flops, read_log
from accel_pretrain.train import host_to_device
from tests.helpers import ROOT, TINY, free_port, launch, train, weights



def _slurm_nodes(args: list, port: int) -> list[subprocess.Popen]:
    """slurm/launch_node.sh as srun would start it on two nodes of one job."""
    procs = []
    for node in (0, 1):
        env = {**os.environ, "SLURM_NODEID": str(node), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[0-1]",
               "MAIN_ADDR": "127.0.0.1", "LOCAL_NODES": "1", "MAIN_PORT": str(port), "GPUS_PER_NODE": "1",
               "CONFIG": "accelerate_configs/cpu_ddp.yaml", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
               "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
        procs.append(subprocess.Popen(["bash", "slurm/launch_node.sh", *map(str, args)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.mark.parametrize("addr", ["127.0.0.1", "localhost"])
def test_several_nodes_never_meet_at_a_loopback_address(tmp_path, addr):
    env = {**os.environ, "SLURM_NODEID": "1", "SLURM_NNODES": "2", "MAIN_ADDR": addr, "GPUS_PER_NODE": "1",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "slurm/launch_node.sh", "--out", tmp_path / "run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"error: MAIN_ADDR {addr} resolves to 127.0.0.1, a loopback address that the other "
                                   "1 node(s) cannot reach; set MAIN_ADDR to an address of the first node on the "
                                   "network they share (hostname -I there)")
    assert not (tmp_path / "run").exists()


def test_slurm_script_on_two_local_nodes_trains_then_a_requeue_resumes(tmp_path, data_dir, ddp_run):
    """slurm/launch_node.sh on two "machines" (one process each: accelerate's --num_machines 2
    --machine_rank 0|1 --main_process_ip) as a requeued job: the run (a copy of conftest's ddp_run,
    preempted after its step-3 save) resumes under `--resume auto`, with --activation_checkpointing,
    and ends bit-identical to ddp_run, the plain one-launch DDP run of the same flags: neither two
    machines, nor the requeue, nor recomputing the blocks changes a bit."""
    run = tmp_path / "run"
    shutil.copytree(ddp_run, run)
    shutil.rmtree(run / "checkpoints/step_0000006")
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 6, "--save_interval", 3, "--eval_interval", 6,
            "--activation_checkpointing", "--eval_tasks", "none"]
    procs = _slurm_nodes(args, free_port())
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    log = read_log(run / "train_log.jsonl")
    assert [r["event"] for r in log if "event" in r] == ["run", "resume", "end"]
    assert [r["step"] for r in log if r.get("event") == "resume"] == [3]
    assert log[0]["world_size"] == 2
    sums = log[-1]["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    ours, plain = weights(run / "checkpoints/step_0000006"), weights(ddp_run / "checkpoints/step_0000006")
    assert all(torch.equal(ours[k], plain[k]) for k in plain)


def test_fsdp_config_on_cpu_is_refused_not_silently_unsharded(tmp_path, data_dir):
    """Accelerate selects FSDP only for accelerators: on CPU an FSDP launch config would run plain
    DDP without a word. PyTorch's fully_shard itself works over gloo; Accelerate does not route it."""
    cfg = tmp_path / "cpu_fsdp.yaml"
    cfg.write_text((ROOT / "accelerate_configs" / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true")
                   .replace("num_processes: 8", "num_processes: 2").replace("mixed_precision: bf16", "mixed_precision: 'no'")
                   .replace("gpu_ids: all\n", "") + f"main_process_port: {free_port()}\n")
    proc = launch(str(cfg), "--data", data_dir, "--out", tmp_path / "run", *TINY, "--max_steps", 2)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and "error: the launch config asks for FSDP" in out, out
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_launch_is_refused_with_the_alternative(tmp_path, data_dir, monkeypatch, capsys):
    """No DeepSpeed config ships (its cycle could not be proven here); a user's own DeepSpeed launch
    gets one line pointing to FSDP2 before anything is written."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, "--max_steps", 2) == 2
    assert capsys.readouterr().err.startswith("error: DeepSpeed is not supported; use accelerate_configs/fsdp.yaml")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("version, precision, expected", [
    ("1", "no", "error: the launch config asks for FSDP1, which flattens the weights"),
    ("2", "fp16", "error: fp16 under FSDP is not supported"),
])
def test_fsdp1_and_fp16_fsdp_are_refused(tmp_path, data_dir, monkeypatch, capsys, version, precision, expected):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, "--mixed_precision", precision) == 2
    assert capsys.readouterr().err.startswith(expected)
    assert not (tmp_path / "run").exists()


def test_fused_adamw_steps_on_cpu():
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, intermediate_size=64))
    opt = build_optimizer(model, TrainConfig(), fused=True)
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in model.parameters()]
    _, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_host_to_device_pins_only_for_cuda(monkeypatch):
    batch = torch.arange(12).view(3, 4)
    assert torch.equal(host_to_device(batch, torch.device("cpu")), batch)
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(1) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)
    host_to_device(batch, torch.device("cuda"))
    assert pinned == [1]


@pytest.mark.parametrize("name, precision, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12), ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA A100-SXM4-80GB", "no", 156e12), ("NVIDIA H200", "fp16", 989e12), ("Some Future GPU", "bf16", None),
    ("NVIDIA L40", "bf16", 181e12), ("NVIDIA L4", "bf16", 121e12), ("NVIDIA L40S", "no", 183e12),
    ("Tesla T4", "fp16", 65e12), ("NVIDIA GeForce RTX 4090", "bf16", 165e12), ("NVIDIA A100 80GB PCIe", "no", 156e12)])
def test_peak_flops_table(monkeypatch, name, precision, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"), precision, None) == expected
    assert peak_flops(torch.device("cpu"), precision, None) is None
    assert peak_flops(torch.device("cpu"), precision, 1e12) == 1e12


def test_mfu_is_logged_against_peak_flops(tmp_path, data_dir):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 3, "--peak_flops", 1e12,
                 "--eval_interval", 3, "--save_interval", 3) == 0
    log = read_log(run / "train_log.jsonl")
    model = Transformer(ModelConfig(**log[0]["config"]["model"]))
    flops = model.flops_per_token(32)
    for r in (r for r in log if "loss" in r):
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / 1e12, rel=1e-9)
    assert json.loads((run / "config.json").read_text())["peak_flops"] == 1e12


@pytest.mark.parametrize("name,bf16", [("NVIDIA H100 NVL", 835e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                      ("NVIDIA H100 PCIe", 756e12), ("NVIDIA GH200 480GB", 989e12),
                                      ("NVIDIA H800", 989e12), ("NVIDIA B200", 2250e12), ("NVIDIA L40", 181e12),
                                      ("NVIDIA L4", 121e12), ("Tesla T4", 65e12)])
def test_peak_flops_by_device_name(monkeypatch, name, bf16):
    from accel_pretrain.tracking import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"), "bf16", None) == bf16


def test_tf32_only_for_fp32_on_cuda():
    from accel_pretrain.launch import allow_tf32

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32("cpu", "no") and not allow_tf32("cuda", "bf16")
        assert torch.get_float32_matmul_precision() == "highest"
        assert allow_tf32("cuda", "no")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


@pytest.mark.parametrize("world,optimizer,compiled", [(1, "adamw", False), (1, "muon", False), (2, "adamw", False),
                                                     (2, "adamw", True)])
def test_no_host_sync_in_steps_between_log_eval_and_save(tmp_path, data_dir, world, optimizer, compiled):
    """Between the steps that log, evaluate or save, a step reads no tensor value on the host and
    starts no collective on the training's group: on a GPU the host never waits for the device and
    the next batch's read and copy overlap the step. The stop vote is one asynchronous all-reduce of
    two integers per step on the training's own group (none on another), read a step later; a signal
    still stops every rank at the same step (test_launch).
    Under DDP, with or without --compile, of the 4 accumulated micro-batches only the last all-reduces."""
    out = tmp_path / "counts.json"
    args = ["--data", data_dir, "--out", tmp_path / "run", *TINY, "--max_steps", 7, "--log_interval", 7,
            "--eval_interval", 7, "--save_interval", 7, "--gradient_accumulation_steps", 4, "--document_masking",
            "--optimizer", optimizer, *(["--compile"] if compiled else [])]
    if world == 1:  # in this process
        from tests.count_syncs import counting

        with counting() as counted:
            assert train(*args) == 0
        (tmp_path / "counts.json.rank0").write_text(json.dumps({str(k): v for k, v in counted.items()}))
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"), "--main_process_port", str(free_port()),
               "-m", "tests.count_syncs", str(out), *map(str, args)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
    for rank in range(world):
        counts = json.loads((tmp_path / f"counts.json.rank{rank}").read_text())
        quiet = {step: counts.get(str(step), [0, 0, 0, 0]) for step in range(2, 7)}  # 1 logs; 7 logs, evaluates, saves
        assert quiet == {step: [0, world - 1, 0, world - 1] for step in range(2, 7)}, counts  # the vote: no other group
        assert counts["1"][3] == counts["7"][3] == world - 1, counts
        assert counts["1"][0] > 0 and counts["7"][0] > 0 and counts["7"][1] >= world - 1, counts  # the counter sees reads
