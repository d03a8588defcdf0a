"""Export loads in plain transformers; evaluate agrees with LlamaForCausalLM on the same windows;
every launch config parses the way `accelerate launch` reads it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from accel_pretrain.errors import run_cli
from tests.helpers import ROOT


def test_export_loads_in_transformers_without_custom_code(tmp_path, trained_run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline

    from accel_pretrain import export
    from accel_pretrain.checkpoint import model_from_checkpoint, resolve_checkpoint

    out = tmp_path / "hf"
    assert run_cli(export.main, [str(trained_run), str(out)]) == 0
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied stays tied
    ours = model_from_checkpoint(resolve_checkpoint(trained_run)).eval()
    x = torch.randint(0, ours.config.vocab_size, (2, 17))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-5
    tok = AutoTokenizer.from_pretrained(out)
    text = pipeline("text-generation", model=str(out))("Document 1: the", max_new_tokens=5, do_sample=False)
    assert text[0]["generated_text"].startswith("Document 1: the") and tok.eos_token == "<|endoftext|>"

    assert run_cli(export.main, [str(trained_run), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_generate_cli_on_run_and_export_agree(tmp_path, trained_run, capsys):
    """The same seed gives the same text from the run directory and from its exported folder."""
    from accel_pretrain import export, generate

    assert run_cli(export.main, [str(trained_run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    texts = []
    for src in (trained_run, tmp_path / "hf"):
        assert run_cli(generate.main, [str(src), "--prompt", "Document 3: the", "--max_new_tokens", "12",
                                       "--seed", "5"]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("Document 3: the") and len(out) > len("Document 3: the") + 1
        assert "tokens/s" in err
        texts.append(out)
    assert texts[0] == texts[1]


def test_evaluate_matches_llama_loss_and_training_eval(tmp_path, trained_run, data_dir, capsys):
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from accel_pretrain import evaluate, export
    from accel_pretrain.tracking import read_log

    assert run_cli(evaluate.main, [str(trained_run), "--data", str(data_dir), "--block_size", "32", "--batch_size", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    hf_dir = tmp_path / "hf"  # the shared run is read-only
    assert run_cli(export.main, [str(trained_run), str(hf_dir)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = np.load(data_dir / "valid_ids.npy").astype(np.int64)
    losses, count = 0.0, 0
    for i in range(0, len(ids) - 32, 32):
        x = torch.from_numpy(ids[i:i + 33])[None]
        with torch.no_grad():
            logits = hf(x[:, :-1]).logits
        losses += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
        count += 32
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(losses / count, rel=1e-5)
    meta = json.loads((data_dir / "meta.json").read_text())
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / np.log(2) * meta["valid_tokens"] / meta["valid_bytes"])
    train_ids = np.load(data_dir / "train_ids.npy").astype(np.int64)
    counts = np.bincount(train_ids, minlength=meta["vocab_size"]) + 1.0
    targets = np.concatenate([ids[i + 1:i + 33] for i in range(0, len(ids) - 32, 32)])
    assert result["unigram_loss"] == pytest.approx(-np.log(counts[targets] / counts.sum()).mean(), rel=1e-9)
    # training's eval on the same first eval_iters x micro_batch_size windows reports the same number
    assert run_cli(evaluate.main, [str(trained_run), "--data", str(data_dir), "--max_windows", "8"]) == 0
    limited = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    val = [r for r in read_log(trained_run / "train_log.jsonl") if "val_loss" in r][-1]["val_loss"]
    assert limited["loss"] == pytest.approx(val, rel=1e-6)


@pytest.mark.parametrize("path", sorted((ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_launch_configs_parse(path: Path):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.mixed_precision in ("no", "bf16", "fp16", None)  # None: train's auto


def test_all_launch_configs_present():
    names = {p.stem for p in (ROOT / "accelerate_configs").glob("*.yaml")}
    assert names == {"cpu", "cpu_ddp", "single_gpu", "single_gpu_bf16", "multi_gpu_ddp_bf16", "multi_gpu_fp16",
                     "fsdp", "multi_node"}


def test_fsdp_full_state_dict_checkpoint_exports(tmp_path, trained_run, capsys):
    """fsdp.yaml checkpoints hold pytorch_model_fsdp.bin instead of model.safetensors."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from accel_pretrain import export
    from accel_pretrain.checkpoint import resolve_checkpoint

    src = resolve_checkpoint(trained_run)
    fsdp_run = tmp_path / "fsdp_run"
    shutil.copytree(trained_run, fsdp_run)
    ckpt = fsdp_run / "checkpoints" / src.name
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model_fsdp.bin")
    assert run_cli(export.main, [str(fsdp_run), str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert torch.equal(hf.model.embed_tokens.weight, state["embed_tokens.weight"])


def test_evaluate_in_the_runs_bf16_reproduces_its_log_exactly(tmp_path, data_dir, capfd, monkeypatch):
    """A run trained and evaluated under bf16 autocast: evaluate's default is the run's precision and
    batch, so its validation loss and task scores are the logged ones, bit for bit; fp32 differs. The
    run scored its tasks twice from one load of their data; evaluate shows a bar over the requests, and
    nothing of lm-eval's own output (its "fatal: not a git repository" outside a repository)."""
    from lm_eval.tasks.manager import TaskManager

    from accel_pretrain import evaluate
    from tokenization.tasks import load_tasks as _load_tasks
    from accel_pretrain.tracking import read_log
    from tests.helpers import TASKS_DIR, TINY, train

    loads = []
    load_spec = TaskManager._load_spec
    monkeypatch.setattr(TaskManager, "_load_spec", lambda self, spec: loads.append(spec) or load_spec(self, spec))
    _load_tasks.cache_clear()
    run, tasks = tmp_path / "run", "hellaswag_local,text_local"
    assert train("--data", data_dir, "--out", run, *TINY, "--mixed_precision", "bf16", "--max_steps", 2,
                 "--eval_interval", 2, "--save_interval", 2, "--eval_tasks", tasks, "--eval_tasks_interval", 1,
                 "--eval_tasks_limit", 6, "--eval_tasks_dir", TASKS_DIR) == 0
    assert sorted(loads) == ["hellaswag_local", "text_local"]  # scored at steps 1 and 2
    log = read_log(run / "train_log.jsonl")
    logged = next(r for r in log if "val_loss" in r)
    scored = [r for r in log if "tasks/text_local/word_perplexity" in r]
    assert [r["step"] for r in scored] == [1, 2]
    trained = capfd.readouterr()  # the scores are log lines; lm-eval's bars stay out of them
    assert "step 2: hellaswag_local" in trained.out and "it/s" not in trained.out + trained.err, trained

    def evaluated(*args: str) -> tuple[dict, str]:
        assert run_cli(evaluate.main, [str(run), *args]) == 0
        captured = capfd.readouterr()
        return json.loads(captured.out.strip().splitlines()[-1]), captured.err

    same, err = evaluated("--data", str(data_dir), "--max_windows", "8")  # eval_iters x micro_batch_size
    assert "precision: bf16 autocast (the run's)" in err and same["precision"] == "bf16 autocast"
    assert same["loss"] == logged["val_loss"]
    fp32, err = evaluated("--data", str(data_dir), "--max_windows", "8", "--precision", "fp32")
    assert "precision: fp32 (--precision)" in err and fp32["loss"] != logged["val_loss"]
    assert fp32["loss"] == pytest.approx(logged["val_loss"], rel=1e-2)

    out = tmp_path / "tasks.json"
    monkeypatch.chdir(tmp_path)  # not a git repository
    _load_tasks.cache_clear()
    assert run_cli(evaluate.main, [str(run), "--tasks", tasks, "--tasks_dir", str(TASKS_DIR), "--limit", "6",
                                   "--output", str(out)]) == 0
    err = capfd.readouterr().err
    assert "scoring loglikelihood requests" in err and "fatal" not in err and "Map" not in err, err
    results = json.loads(out.read_text())["results"]
    assert results["text_local"]["word_perplexity,none"] == scored[-1]["tasks/text_local/word_perplexity"]
    assert results["hellaswag_local"]["acc,none"] == scored[-1]["tasks/hellaswag_local/acc"]
    assert run_cli(evaluate.main, [str(run), "--tasks", tasks, "--data", str(data_dir)]) == 2
    assert capfd.readouterr().err.strip().endswith("--data the validation loss: run them as two commands")
