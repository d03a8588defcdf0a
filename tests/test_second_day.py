"""What a user meets after the demo: resuming and extending a finished run, the precision the README's
commands get, mixtures, a batch that does not fit, typos."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from accel_pretrain.checkpoint import list_checkpoints
from accel_pretrain.errors import run_cli
from tests.helpers import ROOT, TINY, train
from tests.test_bad_input import one_line_error

# TINY without its --mixed_precision, to see what a command that names none gets.
TINY_ANY_PRECISION = TINY[:TINY.index("--mixed_precision")] + TINY[TINY.index("--mixed_precision") + 2:]


def snapshot(run) -> dict[str, bytes]:
    """Every file of a run but its lock, which names its last holder."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_resume_at_or_below_the_checkpoint_refuses_and_a_complete_run_says_so(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    assert train("--out", run, "--resume", "--max_steps", 4) == 2
    one_line_error(capsys, f"--max_steps 4 is below step 6 of {run / 'checkpoints' / 'step_0000006'}; nothing changed")
    # at the checkpoint's step: nothing to do, also for a requeued `--resume auto` job that names its --max_steps
    for resume in (["--resume"], ["--resume=auto"], ["--resume", "--max_steps", "6"], ["--resume", "auto", "--max_steps", "6"]):
        assert train("--out", run, *resume) == 0
        out = capsys.readouterr()
        assert out.out.strip() == "run complete at step 6; raise --max_steps to extend it" and not out.err
    assert snapshot(run) == before  # config.json, train_log.jsonl and checkpoints untouched


def test_extending_a_finished_wsd_run_warns_and_names_the_checkpoint_before_its_decay(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--lr_schedule", "wsd", "--max_steps", 10,
                 "--save_interval", 3, "--keep_checkpoints", 5, "--eval_interval", 10) == 0
    capsys.readouterr()
    assert train("--out", run, "--resume", "--max_steps", 12) == 0
    err = capsys.readouterr().err
    assert (f"warning: step_0000010 is inside this WSD run's decay (it began at step 8 of 10); extending to "
            f"--max_steps 12 sends the lr from 1.65e-03 back up to 3.00e-03. To extend without the jump, restart the "
            f"decay from --resume {run / 'checkpoints' / 'step_0000006'}, or continue at the decayed lr with "
            f"--lr 0.00165 --min_lr 0.0003") in err, err
    lrs = [r["lr"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[-2] == pytest.approx(3e-3)  # step 11: what the warning said
    # From the checkpoint before the decay the extension is what README promises: constant longer, no warning.
    assert train("--out", run, "--resume", run / "checkpoints" / "step_0000006", "--max_steps", 14) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_resume_that_shortens_a_cosine_warns_of_the_lr_jump(tmp_path, data_dir, capsys):
    """--max_steps 8 -> 5 from step 4 moves a cosine from mid-way to its floor in one step: said, with
    the lr before and after; extending by one step moves it little: nothing said."""
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 8, "--save_interval", 4,
                 "--eval_interval", 8) == 0
    capsys.readouterr()
    assert train("--out", run, "--resume", "--max_steps", 9) == 0
    assert "warning" not in capsys.readouterr().err
    assert train("--out", run, "--resume", run / "checkpoints" / "step_0000004", "--max_steps", 5) == 0
    err = capsys.readouterr().err
    lr = [r["lr"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "lr" in r][-1]
    assert ("warning: resuming with max_steps 8 -> 5 moves the lr of step 5 from 2.32e-03 (the run's schedule) to "
            f"{lr:.2e} at once: the cosine schedule follows --max_steps") in err, err


def test_a_command_without_a_precision_gets_auto_and_says_why(tmp_path, data_dir, capsys):
    from accel_pretrain.config import auto_precision

    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY_ANY_PRECISION, "--max_steps", 1) == 0
    chosen = auto_precision()
    why = "auto: native bf16 on this CPU" if chosen == "bf16" else "auto: this CPU has no native bf16"
    banner = {"bf16": "bf16 autocast", "no": "fp32"}[chosen]
    assert f"| {banner} ({why}) |" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["mixed_precision"] == chosen
    import yaml

    for name in ("cpu.yaml", "cpu_ddp.yaml"):  # README's CPU launch configs leave the choice to train
        assert "mixed_precision" not in yaml.safe_load((ROOT / "accelerate_configs" / name).read_text())


@pytest.mark.parametrize("flag, launcher, expected", [
    (None, None, None), (None, "no", None), (None, "bf16", ("bf16", "the launch config")),
    (None, "fp16", ("fp16", "the launch config")), ("no", "bf16", ("no", "--mixed_precision")),
    ("bf16", "no", ("bf16", "--mixed_precision")), ("auto", "fp16", None)])
def test_precision_order_flag_then_launch_config_then_auto(monkeypatch, flag, launcher, expected):
    from accel_pretrain.config import auto_precision, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    chosen, why = resolve_precision(flag)
    if expected is None:  # auto: bf16 only where this CPU has it natively
        assert chosen == auto_precision() and why.startswith("auto: ")
    else:
        assert (chosen, why) == expected


@pytest.mark.parametrize("bf16", [True, False])
def test_a_gpu_keeps_its_launch_configs_fp32_unless_told_auto(monkeypatch, bf16):
    from accel_pretrain.config import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    half = "bf16" if bf16 else "fp16"
    assert resolve_precision(None) == ("no", f"the launch config; --mixed_precision auto would pick {half}")
    assert resolve_precision("auto") == (half, "auto: bf16 on this GPU" if bf16 else "auto: this GPU has no bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert resolve_precision(None) == ("bf16", "the launch config")


def test_a_resumed_run_keeps_its_precision_and_says_where_it_came_from(tmp_path, trained_run, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # a launch config asking for bf16 now
    assert train("--out", run, "--resume", "--max_steps", 7) == 0
    assert "| fp32 (the run's config.json) |" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["mixed_precision"] == "no"


def test_mixture_weights_are_normalised_shown_recorded_and_evaluate_reproduces_val_loss(tmp_path, data_dir, capsys):
    from accel_pretrain import evaluate

    other = tmp_path / "other"
    shutil.copytree(data_dir, other)
    run, spec = tmp_path / "run", f"{data_dir}:0.7,{other}:0.4"
    assert train("--data", spec, "--out", run, *TINY, "--max_steps", 2, "--eval_interval", 2) == 0
    assert (f"data mixture: {data_dir} 63.6%, {other} 36.4% (the weights given sum to 1.1; each is divided by that)"
            in capsys.readouterr().out)
    config = json.loads((run / "config.json").read_text())
    assert config["data"] == spec
    assert config["data_mixture"] == {str(data_dir): pytest.approx(0.7 / 1.1), str(other): pytest.approx(0.4 / 1.1)}
    val = [r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "val_loss" in r][-1]
    windows = config["eval_iters"] * config["micro_batch_size"]
    assert run_cli(evaluate.main, [str(run), "--data", spec, "--max_windows", str(windows)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    help_text = subprocess.run([sys.executable, "-m", "accel_pretrain.evaluate", "--help"], capture_output=True,
                               text=True, cwd=ROOT).stdout
    assert "DIR:WEIGHT" in help_text and "reproduces train_log.jsonl's val_loss" in " ".join(help_text.split())


@pytest.mark.parametrize("args, expected", [
    (["--max_step", "5"], "unknown option --max_step; did you mean --max_steps?"),
    (["--optimizer", "Muon"], "optimizer must be adamw or muon (got 'Muon'); did you mean muon?"),
    (["--lr_schedule", "WSD"], "did you mean wsd?"),
    (["--mixed_precision", "bf61"], "did you mean bf16?"),
    (["--preset", "Mini"], "did you mean mini?"),
    (["--activation_checkpoint"], "did you mean --activation_checkpointing?"),
])
def test_typos_get_the_closest_name(tmp_path, data_dir, capsys, args, expected):
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, *args) == 2
    one_line_error(capsys, expected)
    assert not (tmp_path / "run").exists()


def test_a_batch_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, data_dir, capsys, monkeypatch):
    """The same check as on a machine with 64 MiB free: free_bytes is what changes."""
    import accel_pretrain.memory as memory_module

    monkeypatch.setattr(memory_module, "free_bytes", lambda device: (64 << 20, "of RAM is available"))
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--micro_batch_size", 512, "--max_steps", 2) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a step of micro-batch 512 x 32 tokens needs about ") and "Traceback" not in err, err
    assert ("but only 0.1 GiB of RAM is available; lower --micro_batch_size to " in err
            and "to keep 16,384 tokens per step and process, or pass --activation_checkpointing" in err), err
    assert not run.exists()
    smaller = int(err.split("lower --micro_batch_size to ")[1].split()[0])
    accumulate = int(err.split("--gradient_accumulation_steps to ")[1].split()[0])
    assert smaller * accumulate == 512 and smaller < 512
    assert train("--data", data_dir, "--out", run, *TINY, "--micro_batch_size", smaller,
                 "--gradient_accumulation_steps", accumulate, "--max_steps", 1) == 0  # the advice fits


def test_an_out_that_is_not_our_run_is_never_replaced_without_overwrite(tmp_path, data_dir, trained_run, capsys):
    """A start that died before its first step is replaced on the next try, but only when its
    train_log.jsonl opens with our header: an exported model folder has a config.json too."""
    from accel_pretrain import export

    folder = tmp_path / "hf"
    assert run_cli(export.main, [str(trained_run), str(folder)]) == 0
    before = snapshot(folder)
    assert train("--data", data_dir, "--out", folder, *TINY, "--max_steps", 1) == 2
    one_line_error(capsys, "pass --overwrite")
    assert snapshot(folder) == before


def test_generous_bound_is_above_the_counted_peak():
    """check_memory skips the count below generous_bound: it must never be under what the count gives."""
    from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig
    from accel_pretrain.memory import generous_bound, step_memory

    cases = [("tiny", 4, 32, "no", False, "adamw", 512), ("mini", 8, 256, "bf16", True, "muon", 50257),
             ("tiny", 8, 256, "no", False, "adamw", 151936), ("tiny", 8, 256, "bf16", False, "adamw", 151936),
             ("qwen3-small", 2, 512, "bf16", True, "adamw", 151936), ("small", 2, 256, "fp16", False, "muon", 8192)]
    for preset, mb, T, precision, masking, optimizer, vocab in cases:
        cfg = TrainConfig(micro_batch_size=mb, block_size=T, document_masking=masking, optimizer=optimizer)
        cfg.model = ModelConfig(**PRESETS[preset], vocab_size=vocab)
        assert generous_bound(cfg.model, mb, T, masking) > 1.5 * step_memory(cfg, precision).total, preset


def test_counted_peak_matches_torch_memtracker_and_checkpointing_lowers_it():
    """Our counter against torch's own MemTracker on the same fake step (it is slower, so not used)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig
    from accel_pretrain.memory import step_memory
    from accel_pretrain.model import Transformer
    from accel_pretrain.optim import build_optimizer

    cfg = TrainConfig(micro_batch_size=4, block_size=128)
    cfg.model = ModelConfig(**PRESETS["mini"], vocab_size=4096)
    with FakeTensorMode(), torch.device("cpu"):
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg, fused=False)
        x = torch.zeros(4, 129, dtype=torch.long)
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            for _ in range(2):
                tracker.reset_mod_stats()
                _, loss = model(x[:, :-1], x[:, 1:])  # as train holds them: the logits live through the backward
                loss.backward()
                del loss
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        reference = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    counted = step_memory(cfg, "no")
    assert counted.total == reference
    cfg.activation_checkpointing = True
    assert step_memory(cfg, "no").activations < 0.8 * counted.activations


OOM_RUNNER = textwrap.dedent("""
    import resource, sys
    from accel_pretrain.errors import run_cli
    from accel_pretrain.train import main
    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more address space
    sys.exit(run_cli(main, sys.argv[1:]))
""")


def test_a_real_out_of_memory_is_one_line_and_leaves_nothing_that_blocks_the_next_try(tmp_path, data_dir):
    """The CPU allocator really fails (the process may map only 1 GiB more), after the up-front
    check has passed (it reads the machine's free RAM, not this limit)."""
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = subprocess.run([sys.executable, "-c", OOM_RUNNER, *map(str, args), "--micro_batch_size", "2048"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and len(lines) == 1, failed.stderr
    assert lines[0].startswith("error: out of memory: a step of micro-batch 2048 x 32 tokens tried to allocate ")
    assert "GiB more; lower --micro_batch_size to 1024 and raise --gradient_accumulation_steps to 2" in lines[0]
    assert not list_checkpoints(run)
    assert train(*args) == 0  # the same --out, no --overwrite needed
    assert list_checkpoints(run)


def test_activation_checkpointing_gives_the_plain_gradients_and_run(tmp_path, data_dir):
    """Recomputing each block in the backward changes memory, not arithmetic: fp32 gradients are
    bit-identical, bf16 ones equal to rounding, and a run (resumed half-way) ends on the plain run's weights."""
    from accel_pretrain.config import PRESETS, ModelConfig
    from accel_pretrain.model import Transformer
    from tests.helpers import weights

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**PRESETS["tiny"], vocab_size=512))
    x = torch.randint(0, 512, (2, 33))
    grads = {}
    for precision in ("no", "bf16"):
        for checkpointing in (False, True):
            model.zero_grad(set_to_none=True)
            model.checkpoint_blocks = checkpointing
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                model(x[:, :-1], x[:, 1:])[1].backward()
            grads[precision, checkpointing] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["no", False], grads["no", True]))
    assert all(torch.allclose(a, b, rtol=2e-2, atol=1e-5) for a, b in zip(grads["bf16", False], grads["bf16", True]))

    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert train("--data", data_dir, "--out", plain, *TINY, "--max_steps", 4, "--save_interval", 4) == 0
    assert train("--data", data_dir, "--out", recomputed, *TINY, "--max_steps", 2, "--save_interval", 2,
                 "--activation_checkpointing") == 0
    assert train("--out", recomputed, "--resume", "--max_steps", 4) == 0
    a, b = weights(list_checkpoints(plain)[-1]), weights(list_checkpoints(recomputed)[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((recomputed / "config.json").read_text())["activation_checkpointing"] is True


def test_activation_checkpointing_under_compile(tmp_path, data_dir, trained_run, capsys, monkeypatch):
    """--activation_checkpointing with --compile (Accelerate's inductor backend: the recomputed blocks
    are compiled too; that the checkpointed model is one graph, test_model's fullgraph test) ends within
    float tolerance of the plain eager run of the same flags (conftest's trained_run); --eval_tasks and
    the validation loss score the plain module meanwhile, so `evaluate` reproduces the logged val_loss
    bit for bit. Under DDP checkpointing is bit-identical to the plain run: test_cluster's SLURM test."""
    import accel_pretrain.periodic as periodic
    from accel_pretrain import evaluate
    from accel_pretrain.tracking import read_log
    from tests.helpers import weights

    scored = []
    score = periodic.score
    monkeypatch.setattr(periodic, "score", lambda model, *a: scored.append(type(model).__name__) or score(model, *a))

    compiled = tmp_path / "compiled"
    tasks = ["--eval_tasks", "hellaswag_local", "--eval_tasks_dir", ROOT / "tests" / "tasks", "--eval_tasks_limit", 4]
    assert train("--data", data_dir, "--out", compiled, *TINY, "--max_steps", 6, "--eval_interval", 6,
                 "--save_interval", 6, "--compile", "--activation_checkpointing", *tasks) == 0
    assert [r["step"] for r in read_log(compiled / "train_log.jsonl") if "tasks/hellaswag_local/acc" in r] == [6]
    assert scored == ["Transformer"]  # not the compiled wrapper: no second compilation for eval mode
    losses = [[r["loss"] for r in read_log(run / "train_log.jsonl") if "loss" in r] for run in (trained_run, compiled)]
    assert len(losses[1]) == 6 and losses[1] == pytest.approx(losses[0], rel=1e-6)
    a, b = weights(list_checkpoints(trained_run)[-1]), weights(list_checkpoints(compiled)[-1])
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)  # AdamW moves weights by 3e-3 a step
    capsys.readouterr()
    assert run_cli(evaluate.main, [str(compiled), "--data", str(data_dir), "--max_windows", "8"]) == 0
    logged = next(r["val_loss"] for r in read_log(compiled / "train_log.jsonl") if "val_loss" in r)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] == logged


def test_spike_watch_flags_a_jump_once_and_not_the_noise():
    from accel_pretrain.tracking import SpikeWatch

    rng = torch.Generator().manual_seed(0)
    falling = [6.0 * 0.97 ** i + 0.1 * float(torch.randn((), generator=rng)) for i in range(200)]
    watch = SpikeWatch([])
    assert [watch.check(x) for x in falling] == [None] * 200  # a noisy falling curve: nothing
    watch = SpikeWatch([3.0, 3.1, 2.9] * 4)
    assert watch.check(3.2) is None
    assert watch.check(4.5) == pytest.approx(3.0)  # half a nat and six deviations above the median
    assert watch.check(4.6) is None  # the same spike is reported once
    assert watch.check(3.0) is None and watch.check(float("nan")) is not None  # re-armed once back down


def test_a_spike_after_resuming_with_a_far_higher_lr_is_logged_and_named(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 20, "--save_interval", 20,
                 "--eval_interval", 20) == 0
    events = lambda: [r.get("event") for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())]
    assert "spike" not in events() and "warning" not in capsys.readouterr().err  # an ordinary run: no false alarm
    assert train("--out", run, "--resume", "--max_steps", 24, "--lr", 3.0, "--min_lr", 3.0, "--grad_clip", 0) == 0
    err = capsys.readouterr().err
    assert "warning: loss spike at step 22: " in err and "over the last 20 logged steps" in err, err
    assert f"resume from {run / 'checkpoints' / 'step_0000020'} with a lower --lr" in err
    assert events().count("spike") == 1


def test_plot_marks_divergence_and_refuses_an_unwritable_path_in_one_line(tmp_path, trained_run, capsys):
    from accel_pretrain import plot

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with open(run / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"event": "spike", "step": 6, "median": 3.0}) + "\n")
    assert run_cli(plot.main, [str(run), "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert run_cli(plot.main, [str(run), "--out", "/proc/no/loss.png"]) == 2
    one_line_error(capsys, "cannot write /proc/no/loss.png")


def test_a_cuda_out_of_memory_error_becomes_the_same_one_line(monkeypatch, capsys):
    """torch.OutOfMemoryError as the CUDA caching allocator words it (no GPU here to make one)."""
    from accel_pretrain.config import TrainConfig
    from accel_pretrain.errors import UserError
    from accel_pretrain.memory import out_of_memory_as_user_error

    cfg = TrainConfig(micro_batch_size=16, block_size=1024, gradient_accumulation_steps=4)
    with pytest.raises(UserError) as e, out_of_memory_as_user_error(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.05 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.23 GiB is free. Including non-PyTorch memory ...")
    assert str(e.value) == ("out of memory: a step of micro-batch 16 x 1024 tokens tried to allocate 3.05 GiB more; "
                            "lower --micro_batch_size to 8 and raise --gradient_accumulation_steps to 8 to keep 65,536 "
                            "tokens per step and process, or pass --activation_checkpointing")
    monkeypatch.setenv("RANK", "3")  # a rank other than 0 says it itself: the CLI prints rank 0's errors only
    with pytest.raises(UserError), out_of_memory_as_user_error(cfg):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.05 GiB.")
    assert capsys.readouterr().err.startswith("error: rank 3: out of memory: a step of micro-batch 16 x 1024")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), out_of_memory_as_user_error(cfg):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")  # any other error stays a bug's traceback


def test_memory_model_counts_what_a_real_forward_allocates():
    """benchmarks/memory_model.py, README's micro-batch table: its count against glibc's allocated
    bytes over a real forward (it exits when more than 10% off), and its per-token figure against
    the whole model's saved bytes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import memory_model

    from accel_pretrain.config import PRESETS, ModelConfig

    memory_model.check_against_a_real_forward("no")
    cfg = ModelConfig(**PRESETS["tiny"], vocab_size=512)
    per_token = memory_model.block_bytes_per_token(cfg, 64, "no")
    assert 20 * cfg.hidden_size < per_token < 80 * cfg.hidden_size
