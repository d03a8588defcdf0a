"""The training loop: learning, accumulation, schedule, exact resume, DDP over gloo, two machines, trackers."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from accel_pretrain.config import TrainConfig
from accel_pretrain.optim import lr_at
from accel_pretrain.tracking import read_log
from tests.helpers import TINY, train, weights


def train_lines(run) -> list[dict]:
    return [r for r in read_log(run / "train_log.jsonl") if "loss" in r]


def test_loss_falls_and_run_dir_is_complete(tmp_path, data_dir):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 40, "--eval_interval", 20,
                 "--save_interval", 20) == 0
    log = read_log(run / "train_log.jsonl")
    head = log[0]
    assert head["event"] == "run" and head["world_size"] == 1 and head["tokens_per_step"] == 4 * 32
    assert head["parameters"] > 0 and head["config"]["model"]["vocab_size"] == 512
    losses = [r["loss"] for r in train_lines(run)]
    assert losses[-1] < losses[0] - 1.0, losses
    evals = [r for r in log if "val_loss" in r]
    assert [e["step"] for e in evals] == [20, 40] and evals[1]["val_loss"] < evals[0]["val_loss"]
    assert all(e["val_bpb"] > 0 and abs(e["val_ppl"] - 2.718281828 ** e["val_loss"]) < 1e-6 * e["val_ppl"] for e in evals)
    line = train_lines(run)[-1]
    assert set(line) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed_s"}
    assert line["tokens"] == 40 * 4 * 32
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000020", "step_0000040"]
    assert json.loads((run / "config.json").read_text())["max_steps"] == 40
    assert (run / "tokenizer" / "tokenizer.json").exists()


def test_accumulation_matches_one_big_batch(tmp_path, data_dir):
    common = ["--data", data_dir, *TINY, "--max_steps", 3, "--eval_interval", 3, "--save_interval", 3]
    assert train(*common, "--out", tmp_path / "a", "--gradient_accumulation_steps", 4, "--micro_batch_size", 2) == 0
    assert train(*common, "--out", tmp_path / "b", "--gradient_accumulation_steps", 1, "--micro_batch_size", 8) == 0
    wa, wb = weights(tmp_path / "a/checkpoints/step_0000003"), weights(tmp_path / "b/checkpoints/step_0000003")
    # Gradients agree tightly before Adam; Adam's per-element normalisation can amplify float noise
    # of near-zero gradients, so weights are compared at 1e-5 against updates of about 1e-3 per step.
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=0), k
    la, lb = train_lines(tmp_path / "a"), train_lines(tmp_path / "b")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-5)
    assert [r["grad_norm"] for r in la] == pytest.approx([r["grad_norm"] for r in lb], rel=1e-5)


def test_lr_follows_schedule_formula(tmp_path, data_dir):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 12, "--warmup_steps", 3,
                 "--min_lr", "1e-4", "--eval_interval", 12, "--save_interval", 12) == 0
    cfg = TrainConfig(lr=3e-3, min_lr=1e-4, warmup_steps=3, max_steps=12)
    lrs = [r["lr"] for r in train_lines(run)]
    assert lrs == pytest.approx([lr_at(s, cfg) for s in range(12)], rel=1e-12)
    assert lrs[2] == pytest.approx(3e-3) and lrs[0] == pytest.approx(1e-3) and lrs[-1] > 1e-4


def test_exact_resume_is_bit_identical(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 8, "--eval_interval", 4, "--save_interval", 4,
            "--keep_checkpoints", 5]
    assert train(*args) == 0
    final = weights(run / "checkpoints/step_0000008")
    curve = [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in train_lines(run)]
    shutil.rmtree(run / "checkpoints/step_0000008")  # as if the run had died after step 4's checkpoint
    assert train(*args) == 2  # the run directory is occupied: refused without --resume
    assert train(*args, "--resume") == 0
    resumed = weights(run / "checkpoints/step_0000008")
    for k in final:
        assert torch.equal(final[k], resumed[k]), k
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in train_lines(run)] == curve
    assert [r["event"] for r in read_log(run / "train_log.jsonl") if "event" in r] == ["run", "resume", "end"]



def test_cpu_ddp_two_ranks_stay_identical(ddp_run):
    """conftest's ddp_run: two gloo ranks under cpu_ddp.yaml (two machines, and a SLURM requeue, end
    bit-identical to it: test_cluster)."""
    log = read_log(ddp_run / "train_log.jsonl")
    assert log[0]["world_size"] == 2 and log[0]["tokens_per_step"] == 2 * 4 * 32
    end = log[-1]
    assert end["event"] == "end" and len(end["param_checksums"]) == 2
    assert end["param_checksums"][0] == end["param_checksums"][1]
    assert (ddp_run / "checkpoints/step_0000006/random_states_1.pkl").exists()
    cfg = TrainConfig(lr=3e-3, warmup_steps=2, max_steps=6)
    cfg.validate()
    assert [r["lr"] for r in train_lines(ddp_run)] == pytest.approx([lr_at(s, cfg) for s in range(6)], rel=1e-12)


def test_wandb_offline_writes_a_run(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, "--max_steps", 2, "--eval_interval", 2,
                 "--save_interval", 2, "--report_to", "wandb") == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_and_extending_before_the_decay(tmp_path, data_dir, shape):
    cfg = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=20, lr_schedule="wsd", decay_fraction=0.25,
                      decay_shape=shape)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:2] == pytest.approx([1.5e-3, 3e-3]) and set(lrs[2:16]) == {3e-3}  # the decay starts at step 15
    assert all(a > b for a, b in zip(lrs[15:], lrs[16:])) and lrs[-1] > 3e-4
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--warmup_steps", 2, "--lr_schedule", "wsd", "--decay_fraction",
            0.25, "--decay_shape", shape, "--eval_interval", 100, "--save_interval", 8]
    assert train(*args, "--max_steps", 20) == 0
    shutil.rmtree(run / "checkpoints/step_0000016")
    shutil.rmtree(run / "checkpoints/step_0000020")
    assert train("--out", run, "--resume", "--max_steps", 40) == 0  # from step 8, still in the constant phase
    logged = {r["step"]: r["lr"] for r in train_lines(run)}
    assert [logged[s] for s in range(9, 31)] == [3e-3] * 22  # constant until the new decay at step 30
    assert logged[40] == pytest.approx(lr_at(39, dataclasses.replace(cfg, max_steps=40)))


def test_muon_trains_resumes_bit_identically_and_exports(tmp_path, data_dir):
    from accel_pretrain.export import export

    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--optimizer", "muon", "--max_steps", 8, "--eval_interval", 8,
            "--save_interval", 4, "--gradient_accumulation_steps", 2, "--micro_batch_size", 2]
    assert train(*args) == 0
    losses = [r["loss"] for r in train_lines(run)]
    assert losses[-1] < losses[0]
    final = weights(run / "checkpoints/step_0000008")
    shutil.rmtree(run / "checkpoints/step_0000008")
    assert train("--out", run, "--resume") == 0
    resumed = weights(run / "checkpoints/step_0000008")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    hf = export(str(run), str(tmp_path / "hf"))
    assert train("--data", data_dir, "--out", tmp_path / "again", "--init_from", hf, "--optimizer", "muon",
                 "--max_steps", 2, "--eval_interval", 2, "--save_interval", 2, "--block_size", 32) == 0


def test_muon_ddp_ranks_stay_identical(ddp_muon_run):
    """Muon (bf16) on two gloo ranks: every rank takes the same step (conftest's ddp_muon_run)."""
    sums = read_log(ddp_muon_run / "train_log.jsonl")[-1]["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]


def test_document_masking_trains_resumes_and_evaluates(tmp_path, data_dir, capsys):
    from accel_pretrain import evaluate
    from accel_pretrain.errors import run_cli

    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--document_masking", "--max_steps", 6, "--eval_interval", 3,
            "--save_interval", 3]
    assert train(*args) == 0
    final = weights(run / "checkpoints/step_0000006")
    shutil.rmtree(run / "checkpoints/step_0000006")
    assert train("--out", run, "--resume") == 0
    assert all(torch.equal(final[k], v) for k, v in weights(run / "checkpoints/step_0000006").items())
    capsys.readouterr()
    results = []
    for extra in ([], ["--document_masking"]):
        assert run_cli(evaluate.main, [str(run), "--data", str(data_dir), "--max_windows", "8", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out)["loss"])
    evals = [r["val_loss"] for r in read_log(run / "train_log.jsonl") if "val_loss" in r]
    assert results[1] == pytest.approx(evals[-1], rel=1e-6) and results[0] != results[1]


FAULTS = """
import ctypes, json, resource, torch
from accel_pretrain.launch import keep_freed_memory
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: fault base pages whatever the machine's THP policy
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
logits, dlogp = torch.randn(2048, 8192, requires_grad=True), torch.randn(2048, 8192)
def heap_top() -> None:
    block = libc.malloc(logits.nbytes)
    ctypes.memset(block, 1, logits.nbytes)
    libc.free(block)
# heap_top first, while no freed hole in the heap can hold its block
work = {"heap_top": heap_top, "train": lambda: torch.log_softmax(logits, -1).backward(dlogp)}
def faults_per_pass(passes: int) -> dict[str, list[int]]:
    counts = {}
    for name, fn in work.items():
        counts[name] = []
        for _ in range(passes):
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            counts[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
    return counts
before = faults_per_pass(4)
applied = keep_freed_memory()
print(json.dumps({"pages": logits.nbytes // resource.getpagesize(), "applied": applied, "before": before,
                  "after": faults_per_pass(20)}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_cpu_steps_reuse_freed_memory_instead_of_faulting_it_in_again() -> None:
    """With glibc's defaults a (2048, 8192) log_softmax's 64 MiB output and gradient are mapped afresh
    and faulted in on every pass (blocks over 32 MiB never raise its dynamic mmap threshold), and with
    mmap off a 64 MiB block freed at the heap top is trimmed; after keep_freed_memory, once the heap
    holds them, no pass faults. Counted pass by pass in a fresh child on glibc's malloc, the block
    malloc'd directly and first: a tensor's small allocations land above its data in about half of
    the randomised heap layouts. An RMSNorm's 3 MB blocks are left out: faulted in again or not as
    the layout has it, 770 to 14,400 faults per 20 passes with the defaults."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "GLIBC_TUNABLES") and not k.startswith("MALLOC_")}
    out = json.loads(subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True,
                                    env=env).stdout)
    pages = out["pages"]
    assert out["applied"] is True
    for name in ("heap_top", "train"):
        assert min(out["before"][name][1:]) >= pages, out  # every pass after the first faults its block in
        assert sum(out["after"][name][-8:]) < pages // 100, out  # in steady state none does


def test_tokens_per_second_and_eta_around_a_slow_evaluation(tmp_path, data_dir, capsys, monkeypatch):
    """tokens/s is training tokens over training time (an evaluation of 1 s is not in it), and the ETA
    counts the evaluations still to come at their measured cost."""
    import time

    from accel_pretrain import periodic
    from accel_pretrain.tracking import read_log

    evaluate_step = periodic.evaluate_step

    def slow(run, done):  # noqa: ANN001, ANN202
        time.sleep(1.0)
        return evaluate_step(run, done)

    monkeypatch.setattr(periodic, "evaluate_step", slow)
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 6, "--eval_interval", 2,
                 "--save_interval", 100) == 0
    logged = [r for r in read_log(run / "train_log.jsonl") if "loss" in r]
    assert len(logged) == 6 and all(r["tokens_per_s"] > 128 / 0.5 for r in logged), logged  # 128 tokens per step
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 3/6"))
    hours, minutes, seconds = map(int, line.rsplit("ETA ", 1)[1].split(":"))
    assert 3600 * hours + 60 * minutes + seconds >= 2, line  # the evaluations at steps 4 and 6
