"""fsdp.yaml's FSDP2 on two CPU ranks over gloo, through Accelerate's own FSDP2 path (tests/fsdp_on_cpu.py
lifts only the refusal of FSDP on a CPU), against the unsharded DDP run: AdamW and Muon, bf16 and
activation checkpointing, a save and a resume, global counts in the log, downstream tasks scored during
training as evaluate scores the checkpoint, and an export that loads in transformers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from accel_pretrain.checkpoint import list_checkpoints, load_weights, model_from_checkpoint
from accel_pretrain.tracking import read_log
from tests.helpers import DDP_MUON_RUN, ROOT, TINY, free_port, train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}



def cpu_fsdp_config(tmp_path) -> str:
    """The shipped fsdp.yaml, on two CPU processes."""
    path = tmp_path / "cpu_fsdp.yaml"
    path.write_text((ROOT / "accelerate_configs" / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true")
                    .replace("num_processes: 8", "num_processes: 2").replace("gpu_ids: all\n", ""))
    return str(path)


def run(config: str, module: str, *args, env: dict[str, str] | None = None) -> list[dict]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--main_process_port",
           str(free_port()), "-m", module, *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV | (env or {}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = args[args.index("--out") + 1]
    return read_log(out / "train_log.jsonl")


def losses(log: list[dict]) -> list[float]:
    return [r["loss"] for r in log if "loss" in r]


def test_fsdp2_adamw_trains_resumes_and_exports_as_the_unsharded_run(tmp_path, data_dir, ddp_run, capsys):
    """Against conftest's ddp_run (the same windows under cpu_ddp.yaml: its 4 per step here as 4
    micro-batches of 1), with tasks scored at step 6 as evaluate scores the checkpoint. Checkpoints are
    fsdp.yaml's sharded ones (every rank writes its part); a copy resumed from step 2 ends bit-identical
    to the run that went on, a resume on another number of processes is refused, and export reads the
    shards whole. Between micro-batches a rank holds its shard of the gradient only (sync_each_batch)."""
    tasks = ROOT / "tests" / "tasks"
    args = ["--data", data_dir, *TINY, "--eval_interval", 100, "--save_interval", 2, "--micro_batch_size", 1,
            "--gradient_accumulation_steps", 4, "--max_steps", 6, "--keep_checkpoints", 5, "--eval_tasks",
            "hellaswag_local,text_local", "--eval_tasks_interval", 6, "--eval_tasks_limit", 6, "--eval_tasks_dir", tasks]
    ddp = read_log(ddp_run / "train_log.jsonl")
    fsdp, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    config = cpu_fsdp_config(tmp_path)
    log = run(config, "tests.fsdp_on_cpu", *args, "--out", fsdp, env={"GRADIENT_BYTES": str(tmp_path / "held")})
    assert log[0]["parameters"] == ddp[0]["parameters"]  # global sizes, not a rank's shard
    whole = 4 * log[0]["parameters"]  # fp32 bytes of the whole gradient
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"held.rank{rank}").read_text())
        assert len(seen) == 24 and all(whole * 0.45 < b < whole * 0.55 for b in seen), (seen, whole)
    assert losses(log) == pytest.approx(losses(ddp), rel=1e-5)
    end, ddp_end = log[-1], [r for r in ddp if r.get("event") == "end"][0]
    assert end["event"] == "end" and end["param_checksums"][0] == end["param_checksums"][1]
    assert end["param_checksums"][0] == pytest.approx(ddp_end["param_checksums"][0], rel=1e-6)
    ckpt = list_checkpoints(fsdp)[-1]
    assert (ckpt / "pytorch_model_fsdp_0" / ".metadata").is_file() and not (ckpt / "pytorch_model_fsdp.bin").exists()

    shutil.copytree(fsdp, resumed)
    again = run(config, "tests.fsdp_on_cpu", "--out", resumed, "--resume", resumed / "checkpoints" / "step_0000002",
                "--eval_tasks", "none")  # scored above, after the last save
    assert [r["step"] for r in again if r.get("event") == "resume"] == [2] and losses(again) == losses(log)
    a, b = (load_weights(list_checkpoints(r)[-1]) for r in (fsdp, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert train("--out", resumed, "--resume", "--max_steps", 8) == 2  # one process, shards of two
    assert capsys.readouterr().err.strip().endswith("its FSDP shards were written by 2; resume with 2, or start a new "
                                                    f"run from its weights with --init_from {list_checkpoints(resumed)[-1]}")
    from accel_pretrain import evaluate

    assert evaluate.main([str(fsdp), "--tasks", "hellaswag_local,text_local", "--tasks_dir", str(tasks), "--limit", "6",
                          "--output", str(tmp_path / "cli.json")]) == 0
    cli = json.loads((tmp_path / "cli.json").read_text())["results"]
    scored = [r for r in log if "tasks/hellaswag_local/acc" in r]
    assert [r["step"] for r in scored] == [6] and scored[0]["tasks/hellaswag_local/acc"] == cli["hellaswag_local"]["acc,none"]
    assert scored[0]["tasks/text_local/word_perplexity"] == pytest.approx(cli["text_local"]["word_perplexity,none"], rel=1e-5)

    from transformers import AutoModelForCausalLM

    from accel_pretrain import export

    assert export.main([str(fsdp), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours = model_from_checkpoint(ckpt).eval()
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], rtol=1e-4, atol=1e-4)


def test_fsdp2_muon_in_bf16_with_activation_checkpointing_under_compile_follows_the_unsharded_run(
        tmp_path, data_dir, ddp_muon_run):
    """Muon steps the sharded matrices with the update of the whole matrix (gathered in bf16); bf16
    here is FSDP2's bf16 weights with fp32 reduction against DDP's bf16 autocast (conftest's
    ddp_muon_run, the same flags, eager), so the two agree to bf16's precision, not bit for bit.
    --compile: each checkpointed Block compiled in place, then sharded (torchtitan's order), with no
    graph break (whole-model compilation would break at every block's FSDP hooks); aot_eager here,
    dynamo's graphs and AOT autograd as under inductor (whose numbers against eager: test_second_day)."""
    ddp = read_log(ddp_muon_run / "train_log.jsonl")
    fsdp = run(cpu_fsdp_config(tmp_path), "tests.fsdp_on_cpu", "--data", data_dir, *DDP_MUON_RUN,
               "--activation_checkpointing", "--compile", "--out", tmp_path / "fsdp",
               env={"COMPILE_BACKEND": "aot_eager", "GRAPHS": str(tmp_path / "graphs")})
    assert fsdp[0]["mixed_precision"] == "bf16" and fsdp[0]["world_size"] == 2
    for rank in (0, 1):
        counts = json.loads((tmp_path / f"graphs.rank{rank}").read_text())
        assert counts["graph_breaks"] == 0 and counts["graphs"] >= 2, counts

    assert losses(fsdp) == pytest.approx(losses(ddp), rel=2e-2)
    assert losses(fsdp)[-1] < losses(fsdp)[0] - 0.3  # it learns
    end = fsdp[-1]
    assert end["param_checksums"][0] == end["param_checksums"][1]
    assert end["param_checksums"][0] == pytest.approx(ddp[-1]["param_checksums"][0], rel=1e-3)


def test_muon_shares_newton_schulz_out_and_takes_torchs_step_bit_for_bit(tmp_path):
    """Three gloo ranks: MuonAdamW on replicated matrices (as under DDP) and on fully_shard'ed ones (a
    tall, a wide, rows that do not divide evenly) takes exactly torch.optim.Muon's own step, three steps
    running, while each rank runs Newton-Schulz on its share of the matrices only (4 matrices: 2 on rank
    0, 1 on each other rank, so a rank with several shares and ranks with one; two ranks under FSDP2
    and DDP: the runs of test_fsdp2_muon and test_train's Muon DDP test)."""
    world = 3
    script = tmp_path / "muon_shards.py"
    script.write_text('''
import math, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.optim import _muon
from accel_pretrain.config import TrainConfig
from accel_pretrain.optim import build_optimizer

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
calls = [0]
newton_schulz = _muon._zeropower_via_newtonschulz
def counted(*args):
    calls[0] += 1
    return newton_schulz(*args)
_muon._zeropower_via_newtonschulz = counted
def make():
    torch.manual_seed(0)
    m = torch.nn.Module()
    m.layers = torch.nn.ModuleList([torch.nn.Linear(24, 64, bias=False), torch.nn.Linear(64, 24, bias=False),
                                    torch.nn.Linear(24, 33, bias=False), torch.nn.Linear(33, 24, bias=False)])
    return m
def loss(m, x):
    h = x
    for layer in m.layers[:2]:
        h = layer(h)
    return h.square().mean() + m.layers[3](m.layers[2](x)).square().mean()
cfg = TrainConfig(optimizer="muon", lr=0.02)
reference, plain, sharded = make(), make(), make()
for layer in sharded.layers:
    fully_shard(layer)
fully_shard(sharded)
opts = [build_optimizer(m, cfg, fused=False) for m in (reference, plain, sharded)]
shared_calls = []
for step in range(3):
    x = torch.randn(8, 24, generator=torch.Generator().manual_seed(step))
    for m, opt in zip((reference, plain, sharded), opts):
        loss(m, x).backward()
        before = calls[0]
        if m is reference:  # torch's own: every matrix orthogonalised here
            opt.muon.step()
            opt.adamw.step()
        else:
            opt.step()
            shared_calls.append(calls[0] - before)
        opt.zero_grad()
for a, b, c in zip(reference.parameters(), plain.parameters(), sharded.parameters()):
    assert torch.equal(a, b) and torch.equal(a, c.full_tensor()), (a - c.full_tensor()).abs().max()
mine = len(range(rank, 4, world))
assert shared_calls == [mine] * 6, (shared_calls, mine)
print("equal", mine)
dist.destroy_process_group()  # gloo's threads joined before exit: without it a rank can abort at teardown
''')
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                           "--master_port", str(free_port()), str(script)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("equal") == world, proc.stdout + proc.stderr


def test_the_fsdp2_step_at_8_gpus_simulated_on_fake_ranks():
    """accel_pretrain.fsdp_sim on 8 fake ranks (what the memory preflight runs for an FSDP launch, in a
    process of its own): each rank's traffic is FSDP2's, to the byte (per step, every block's bf16
    weights gathered for the forward and again for the backward, its fp32 gradient reduce-scattered;
    the root's weights gathered once: 7/8 of each), and its peak is more than the old count of
    sharded state plus activations, which left out FSDP's gathered blocks and buffers."""
    from accel_pretrain.config import ModelConfig, TrainConfig
    from accel_pretrain.fsdp_sim import simulate_elsewhere
    from accel_pretrain.memory import step_memory
    from accel_pretrain.model import Transformer

    cfg = ModelConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    train = TrainConfig(micro_batch_size=2, block_size=64, model=cfg)
    train.validate()
    counted = simulate_elsewhere(train, "bf16", 8)
    model = Transformer(cfg)
    blocks = sum(p.numel() for p in model.layers.parameters())
    root = sum(p.numel() for p in model.parameters()) - blocks
    assert counted["traffic"] == pytest.approx(7 / 8 * (blocks * (2 + 2 + 4) + root * (2 + 4)), rel=1e-3), counted
    old = step_memory(train, "bf16", shards=8)
    assert counted["state"] + counted["activations"] > old.total * 1.2, (counted, old)
    assert counted["state"] < step_memory(train, "bf16").state / 4  # sharded eight ways
