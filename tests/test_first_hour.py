"""What a newcomer meets in the first hour: resume that remembers the run, messages that point the
right way, readable logs and help."""
from __future__ import annotations

import json
import shutil

import torch

from accel_pretrain.errors import run_cli
from tests.conftest import make_documents
from tests.helpers import TINY, train, weights
from tests.test_bad_input import one_line_error


def test_resume_with_only_out_continues_the_run_bit_identically(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY, "--lr", "2e-3", "--max_steps", 8, "--save_interval", 4,
                 "--eval_interval", 4, "--warmup_steps", 3) == 0
    final = weights(run / "checkpoints/step_0000008")
    shutil.rmtree(run / "checkpoints/step_0000008")
    capsys.readouterr()
    assert train("--out", run, "--resume") == 0
    assert "resuming with" not in capsys.readouterr().out  # nothing changed, nothing to say
    resumed = weights(run / "checkpoints/step_0000008")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    lrs = [r["lr"] for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines()) if "lr" in r]
    assert max(lrs) == 2e-3  # the run's own lr, not the default 6e-4

    assert train("--out", run, "--resume", "--max_steps", 12, "--lr", "1e-3") == 0  # extend a finished run
    assert "resuming with max_steps 8 -> 12, lr 0.002 -> 0.001" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())
    assert saved["max_steps"] == 12 and saved["lr"] == 1e-3 and saved["model"]["hidden_size"] == 96


def test_resume_auto_starts_or_continues(tmp_path, data_dir):
    run = tmp_path / "run"
    args = ["--data", data_dir, "--out", run, *TINY, "--max_steps", 4, "--save_interval", 2, "--eval_interval", 4]
    assert train(*args, "--resume", "auto") == 0  # nothing there: a fresh run
    shutil.rmtree(run / "checkpoints/step_0000004")
    assert train(*args, "--resume", "auto") == 0  # requeued: continues from step 2
    events = [json.loads(line).get("event") for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [e for e in events if e] == ["run", "resume", "end"]
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "config.json").write_text((run / "config.json").read_text())
    (crashed / "train_log.jsonl").write_text("")
    assert train(*args[:2], "--out", crashed, *args[4:], "--resume", "auto") == 0
    assert (crashed / "checkpoints/step_0000004").is_dir()


def test_a_run_that_died_before_its_first_checkpoint_points_to_overwrite(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "train_log.jsonl").write_text('{"event": "run", "step": 0}\n{"step": 1, "loss": 6.2}\n')
    assert train("--data", data_dir, "--out", run, *TINY) == 2
    one_line_error(capsys, "stopped before its first checkpoint; pass --overwrite")
    assert train("--data", data_dir, "--out", run, *TINY, "--resume") == 2
    one_line_error(capsys, "start it again with --overwrite")


def test_a_run_that_died_before_its_first_step_does_not_block_the_next(tmp_path, data_dir, capsys):
    """Killed (or out of memory) before one optimizer step: only its header was written, nothing to
    lose, so the same command starts over without --overwrite."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "train_log.jsonl").write_text('{"event": "run", "step": 0}\n{"event": "run", "st')  # cut by a kill
    (run / "notes.txt").write_text("mine")
    assert train("--data", data_dir, "--out", run, *TINY, "--max_steps", 1) == 0
    assert json.loads((run / "config.json").read_text())["max_steps"] == 1
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_wandb_without_login_fails_before_writing(tmp_path, data_dir, capsys, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, "--report_to", "wandb") == 2
    one_line_error(capsys, "needs a login")
    assert not (tmp_path / "run").exists()


def test_init_from_with_a_shape_is_refused(tmp_path, data_dir, capsys):
    assert train("--data", data_dir, "--out", tmp_path / "run", "--init_from", tmp_path, "--hidden_size", 64) == 2
    one_line_error(capsys, "--init_from takes the model's shape from the checkpoint; drop --hidden_size")


def test_data_of_another_tokenizer_of_the_same_size_is_refused(tmp_path, trained_run, capsys):
    from accel_pretrain import evaluate
    from accel_pretrain.export import export
    from tokenization.prepare import main as prepare

    corpus = tmp_path / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": d.upper()}) + "\n" for d in make_documents(300, seed=9)))
    assert prepare([str(corpus), "--out", str(tmp_path / "other"), "--vocab_size", "512"]) == 0
    assert json.loads((tmp_path / "other" / "meta.json").read_text())["vocab_size"] == 512
    capsys.readouterr()
    assert run_cli(evaluate.main, [str(trained_run), "--data", str(tmp_path / "other")]) == 2
    one_line_error(capsys, "was prepared with another tokenizer")
    hf = export(str(trained_run), str(tmp_path / "hf"))
    assert train("--data", tmp_path / "other", "--out", tmp_path / "run", "--init_from", hf, "--max_steps", 2) == 2
    one_line_error(capsys, "was prepared with another tokenizer")
    assert not (tmp_path / "run").exists()


def test_logs_and_help_a_person_can_read(tmp_path, data_dir, capsys):
    """What train prints, in this process (that a CLI process prints no traceback: test_bad_input)."""
    assert train("--data", data_dir, "--out", tmp_path / "run", *TINY, "--max_steps", 4, "--log_interval", 2) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "| fp32 (--mixed_precision) |" in lines[0], lines[0]
    progress = [line for line in lines if line.startswith("step ") and "tok/s" in line]
    assert [p.split(" | ")[0] for p in progress] == ["step 1/4", "step 2/4", "step 4/4"], lines
    assert all("loss " in p and "ETA " in p for p in progress)

    assert train("--help") == 0
    text = capsys.readouterr().out
    assert "--config FILE.yaml" in text
    assert "--gradient_accumulation_steps  micro-batches per optimizer step (default 1)" in text


def test_yaml_error_names_file_and_line(tmp_path, data_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 2\nlr: [1e-3\nwarmup_steps: 1\n")
    assert train("--data", data_dir, "--out", tmp_path / "run", "--config", cfg) == 2
    one_line_error(capsys, f"config file {cfg}, line 3")
    cfg.write_text(f"data:\n  - {data_dir}:0.5\n  - path: {data_dir}\n    weight: 0.5\n")
    from accel_pretrain.config import resolve

    assert resolve(["--config", str(cfg)]).data == f"{data_dir}:0.5,{data_dir}:0.5"


def test_the_quick_starts_corpus_is_the_same_every_run_and_stops_at_its_size(tmp_path, capsys, monkeypatch):
    """`make demo`'s first step: stdlib docstrings, no download; the same file whatever order the
    filesystem lists the modules in (so README's demo figures are reproducible), cut after --max_mb,
    and no .partial file left behind."""
    from pathlib import Path

    from tokenization import sample_corpus

    outs = [tmp_path / "a" / "corpus.jsonl", tmp_path / "b" / "corpus.jsonl"]
    assert sample_corpus.main([str(outs[0]), "--max_mb", "0.2"]) == 0
    listed = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(listed(self, pattern))))
    assert sample_corpus.main([str(outs[1]), "--max_mb", "0.2"]) == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    docs = [json.loads(line)["text"] for line in outs[0].read_text(encoding="utf-8").splitlines()]
    size = sum(len(d.encode("utf-8")) for d in docs)
    assert size >= 200_000 and size - len(docs[-1].encode("utf-8")) < 200_000  # stopped at the first past it
    assert sorted(p.name for p in outs[0].parent.iterdir()) == ["corpus.jsonl"]
    assert f"{len(docs)} documents, {size / 1e6:.1f} MB of standard-library docstrings" in capsys.readouterr().out
