"""Every user mistake: one line on stderr, exit code 2, no traceback, nothing the user had is lost."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from accel_pretrain.errors import run_cli
from tests.helpers import ROOT, TINY, train


def one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert "Traceback" not in err[0]


def broken_data(tmp_path, data_dir, how: str):
    d = tmp_path / "data"
    shutil.copytree(data_dir, d)
    meta = json.loads((d / "meta.json").read_text())
    if how == "incomplete":
        (d / "valid_ids.npy").unlink()
    elif how == "dtype":
        np.save(d / "train_ids.npy", np.load(d / "train_ids.npy").astype(np.uint32))
    elif how == "length":
        np.save(d / "train_ids.npy", np.load(d / "train_ids.npy")[:-5])
    elif how == "vocab":
        meta["vocab_size"] = 100
        (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize("how, expected", [
    ("missing", "not found"), ("incomplete", "missing valid_ids.npy"), ("dtype", "but meta.json says"),
    ("length", "tokens, but meta.json says"), ("vocab", "holds token id"),
])
def test_train_rejects_bad_data(tmp_path, data_dir, capsys, how, expected):
    d = tmp_path / "nowhere" if how == "missing" else broken_data(tmp_path, data_dir, how)
    assert train("--data", d, "--out", tmp_path / "run", *TINY, "--max_steps", 2) == 2
    one_line_error(capsys, expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, expected", [
    (["--no_such_field", "1"], "unknown option --no_such_field"),
    (["--lr", "fast"], "lr must be float"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be at least 1"),
    (["--hidden_size", "100", "--num_attention_heads", "3"], "must divide hidden_size"),
    (["--block_size", "3000", "--max_position_embeddings", "4096"], "needs at least 3001 tokens"),
    (["--block_size", "5000"], "exceeds max_position_embeddings"),
    (["--preset", "huge"], "unknown preset"),
    (["--init_from", "NOT_LLAMA"], "does not fit our architecture"),
])
def test_train_rejects_bad_config(tmp_path, data_dir, capsys, args, expected):
    if "NOT_LLAMA" in args:
        from transformers import GPT2Config

        GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
        args = ["--init_from", str(tmp_path / "gpt2")]
    tiny = TINY[2:] if "--init_from" in args else TINY  # --init_from refuses a --preset
    assert train("--data", data_dir, "--out", tmp_path / "run", *tiny, "--max_steps", 2, *args) == 2
    one_line_error(capsys, expected)
    assert not (tmp_path / "run").exists()


def test_yaml_config_unknown_key_and_type(tmp_path, data_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2\nmodel:\n  hidden_sise: 64\n")
    assert train("--data", data_dir, "--out", tmp_path / "run", "--config", cfg) == 2
    one_line_error(capsys, "unknown model field 'hidden_sise'")
    cfg.write_text("max_steps: two\n")
    assert train("--data", data_dir, "--out", tmp_path / "run", "--config", cfg) == 2
    one_line_error(capsys, "max_steps must be int")


def test_occupied_run_dir_and_resume_mismatches(tmp_path, data_dir, trained_run, capsys):
    before = sorted(p.name for p in trained_run.rglob("*"))
    assert train("--data", data_dir, "--out", trained_run, *TINY, "--max_steps", 2) == 2
    one_line_error(capsys, "already holds a run")
    assert train("--data", data_dir, "--out", trained_run, *TINY, "--max_steps", 8, "--resume",
                 "--num_hidden_layers", 3) == 2
    one_line_error(capsys, "the model shape differs (num_hidden_layers 2 -> 3)")
    other = broken_data(tmp_path, data_dir, "none")
    meta = json.loads((other / "meta.json").read_text())
    meta["seed"] = 999
    (other / "meta.json").write_text(json.dumps(meta))
    assert train("--data", other, "--out", trained_run, *TINY, "--max_steps", 8, "--resume") == 2
    one_line_error(capsys, "trained on other data")
    # refused even though the run is complete (no --max_steps above its last step)
    assert train("--data", data_dir, "--out", trained_run, "--resume", "--num_hidden_layers", 3) == 2
    one_line_error(capsys, "the model shape differs (num_hidden_layers 2 -> 3)")
    meta |= {"tokenizer_fingerprint": "f" * 64, "tokenizer": "another/tokenizer"}
    (other / "meta.json").write_text(json.dumps(meta))
    assert train("--data", other, "--out", trained_run, "--resume") == 2
    one_line_error(capsys, f"it was trained on data of another tokenizer (byte-level BPE trained on the corpus (vocab 512), vocabulary "
                           f"512) than "
                           f"{other} (another/tokenizer, vocabulary 512); a run keeps its tokenizer: prepare the data "
                           f"with --tokenizer {trained_run / 'tokenizer'}")
    assert train("--data", data_dir, "--out", tmp_path / "fresh", *TINY, "--resume") == 2
    one_line_error(capsys, "holds no run")
    assert sorted(p.name for p in trained_run.rglob("*")) == before


def test_export_evaluate_generate_bad_input(tmp_path, data_dir, trained_run, capsys):
    from accel_pretrain import evaluate, export, generate

    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "train_log.jsonl").write_text("")
    assert run_cli(export.main, [str(empty), str(tmp_path / "hf")]) == 2
    one_line_error(capsys, "holds no checkpoint")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "mine.txt").write_text("keep")
    assert run_cli(export.main, [str(trained_run), str(occupied)]) == 2
    one_line_error(capsys, "already exists")
    assert (occupied / "mine.txt").read_text() == "keep"

    assert run_cli(evaluate.main, [str(trained_run), "--data", str(tmp_path / "nowhere")]) == 2
    one_line_error(capsys, "not found")
    assert run_cli(evaluate.main, [str(trained_run), "--data", str(data_dir), "--block_size", "100000"]) == 2
    one_line_error(capsys, "validation tokens")
    wide = broken_data(tmp_path, data_dir, "none")  # ids beyond the trained model's 512 entries
    meta = json.loads((wide / "meta.json").read_text())
    ids = np.load(wide / "valid_ids.npy")
    ids[3] = 600
    np.save(wide / "valid_ids.npy", ids)
    wide_meta = {**meta, "vocab_size": 1000, "max_token_id": {**meta["max_token_id"], "valid": 600}}
    (wide / "meta.json").write_text(json.dumps(wide_meta))
    assert run_cli(evaluate.main, [str(trained_run), "--data", str(wide)]) == 2
    one_line_error(capsys, "holds token id 600")
    assert run_cli(evaluate.main, [str(tmp_path / "nope"), "--data", str(data_dir)]) == 2
    one_line_error(capsys, "cannot load Hugging Face model")

    assert run_cli(generate.main, [str(trained_run), "--prompt", "the", "--max_new_tokens", "0"]) == 2
    one_line_error(capsys, "--max_new_tokens >= 1")
    assert run_cli(generate.main, [str(empty), "--prompt", "the"]) == 2
    one_line_error(capsys, "holds no checkpoint")


@pytest.mark.parametrize("module", ["train", "evaluate", "export", "generate"])
def test_cli_processes_print_no_traceback(tmp_path, module):
    args = {"train": ["--data", str(tmp_path / "none")], "evaluate": [str(tmp_path), "--data", str(tmp_path / "x")],
            "export": [str(tmp_path / "none"), str(tmp_path / "out")], "generate": [str(tmp_path / "none")]}[module]
    proc = subprocess.run([sys.executable, "-m", f"accel_pretrain.{module}", *args], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
