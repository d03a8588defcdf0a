"""Downstream tasks through lm-evaluation-harness (accel_pretrain.downstream): our model behind lm-eval's
interface gives what `lm_eval --model hf` gives on the export, request by request, for every task
type (multiple choice, Winogrande's several contexts, rolling perplexity, greedy generation), for a
run from scratch and one started --init_from; the CLI's table, JSON and one-line mistakes. The tasks
are lm-eval's own prompts on small local slices (tests/tasks/)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from accel_pretrain.errors import run_cli
from tests.helpers import ROOT, train

TASKS_DIR = str(ROOT / "tests" / "tasks")
TASKS = ["hellaswag_local", "arc_easy_local", "winogrande_local", "boolq_local", "text_local", "continue_local"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def samples(lm, limit: int = 6) -> dict:
    import lm_eval.evaluator

    from tokenization.tasks import task_manager

    out = lm_eval.evaluator.simple_evaluate(model=lm, tasks=TASKS, limit=limit, log_samples=True, bootstrap_iters=0,
                                            task_manager=task_manager(TASKS_DIR))  # indexed once per process
    return out


def ours(source) -> object:
    from transformers import AutoTokenizer

    from accel_pretrain.checkpoint import load_any
    from accel_pretrain.task_lm import TaskLM

    model, tokenizer, _ = load_any(str(source))
    return TaskLM(model.eval(), AutoTokenizer.from_pretrained(tokenizer), 4, torch.device("cpu"))


def assert_same(a: dict, b: dict) -> None:
    """Every request's response alike (log-probabilities to fp32 noise, greedy flags and generated text
    exactly), and acc / acc_norm identical."""
    for task in TASKS:
        for x, y in zip(a["samples"][task], b["samples"][task], strict=True):
            assert x["doc_id"] == y["doc_id"] and x["arguments"] == y["arguments"]
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                rx, ry = rx[0], ry[0]
                if isinstance(rx, str):
                    assert rx == ry, task
                elif isinstance(rx, tuple):
                    assert rx[1] == ry[1] and rx[0] == pytest.approx(ry[0], rel=1e-4, abs=1e-4), task
                else:
                    assert rx == pytest.approx(ry, rel=1e-5), task
        for metric in ("acc,none", "acc_norm,none", "exact_match,none", "word_perplexity,none"):
            if metric in a["results"][task]:
                assert a["results"][task][metric] == pytest.approx(b["results"][task][metric], rel=1e-5), (task, metric)


def test_scores_equal_lm_evals_own_hf_model_on_the_export_from_scratch_and_init_from(tmp_path, trained_run, data_dir):
    from lm_eval.models.huggingface import HFLM

    from accel_pretrain import export

    assert export.main([str(trained_run), str(tmp_path / "hf")]) == 0
    ours_out = samples(ours(trained_run))
    assert_same(ours_out, samples(HFLM(pretrained=str(tmp_path / "hf"), batch_size=4, device="cpu")))
    assert set(ours_out["results"]) >= set(TASKS)
    assert ours_out["results"]["text_local"]["word_perplexity,none"] > 1
    # a run started from that export (an --init_from of a Hugging Face model), exported again
    run = tmp_path / "init"
    assert train("--data", data_dir, "--out", run, "--init_from", tmp_path / "hf", "--block_size", 32,
                 "--micro_batch_size", 4, "--max_steps", 2, "--warmup_steps", 1, "--eval_iters", 1,
                 "--mixed_precision", "no") == 0
    assert export.main([str(run), str(tmp_path / "hf2")]) == 0
    assert_same(samples(ours(run)), samples(HFLM(pretrained=str(tmp_path / "hf2"), batch_size=4, device="cpu")))


def test_cli_prints_the_table_and_writes_the_json(tmp_path, trained_run, capsys):
    from accel_pretrain import evaluate

    out = tmp_path / "scores.json"
    assert run_cli(evaluate.main, [str(trained_run), "--tasks", "hellaswag_local,arc_easy_local,winogrande_local",
                                   "--tasks_dir", TASKS_DIR, "--limit", "8", "--output", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["task", "metric", "value", "stderr", "random"]
    scores = json.loads(out.read_text())
    assert scores["random"]["hellaswag_local"] == 0.25 and scores["random"]["winogrande_local"] == 0.5
    acc = {t: scores["results"][t]["acc,none"] for t in scores["random"]}
    assert scores["core"] == pytest.approx(sum((acc[t] - r) / (1 - r) for t, r in scores["random"].items()) / 3)
    assert any(line.startswith("CORE") for line in lines)
    assert scores["config"]["limit"] == 8 and all(v["effective"] == 8 for v in scores["n_samples"].values())


@pytest.mark.parametrize("args, expected", [
    (["--tasks", "hellaswag_locl", "--tasks_dir", TASKS_DIR], "error: unknown task 'hellaswag_locl'; did you mean hellaswag_local"),
    (["--tasks", "arc_easy", "--tasks_dir", TASKS_DIR], "error: task data is not available offline ("),  # indexed once
    (["--tasks", "piqa_local", "--tasks_dir", "/nonexistent"], "error: --tasks_dir /nonexistent is not a directory"),
])
def test_task_mistakes_are_one_line(trained_run, capsys, args, expected):
    from accel_pretrain import evaluate

    assert run_cli(evaluate.main, [str(trained_run), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err
    if "offline" in expected:
        assert "--tasks_dir DIR" in err[0]


def test_without_lm_eval_the_pip_line(trained_run, capsys, monkeypatch):
    from accel_pretrain import evaluate

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert run_cli(evaluate.main, [str(trained_run), "--tasks", "hellaswag"]) == 2
    assert capsys.readouterr().err.strip() == ("error: downstream tasks need lm-evaluation-harness: "
                                               "pip install 'accel-pretrain[eval]' (or pip install lm-eval)")


def task_lines(run) -> dict[int, dict]:
    from accel_pretrain.tracking import read_log

    return {r["step"]: r for r in read_log(run / "train_log.jsonl") if any(k.startswith("tasks/") for k in r)}


def cli_scores(source, tasks: list[str], limit: int, tmp_path) -> dict:
    from accel_pretrain import evaluate

    out = tmp_path / "cli.json"
    assert run_cli(evaluate.main, [str(source), "--tasks", ",".join(tasks), "--tasks_dir", TASKS_DIR,
                                   "--limit", str(limit), "--output", str(out)]) == 0
    return json.loads(out.read_text())


def test_tasks_during_training_under_ddp_equal_one_process_on_the_checkpoint(tmp_path, ddp_run):
    """Two gloo ranks (conftest's ddp_run): each scores half the documents, right after the step's
    checkpoint; the logged scores equal evaluate's, in one process, on that checkpoint (under
    --compile: test_second_day, under FSDP2: test_fsdp2)."""
    from accel_pretrain.checkpoint import list_checkpoints
    from tests.helpers import DDP_TASKS

    logged = task_lines(ddp_run)
    assert list(logged) == [6] and list_checkpoints(ddp_run)[-1].name == "step_0000006"  # scored after its save
    cli = cli_scores(list_checkpoints(ddp_run)[-1], DDP_TASKS, 6, tmp_path)
    expected = {f"tasks/{t}/{k.split(',')[0]}": v for t, m in cli["results"].items() for k, v in m.items()
                if "_stderr" not in k and isinstance(v, float)}
    assert set(expected) <= set(logged[6])
    for key, value in expected.items():
        assert logged[6][key] == pytest.approx(value, rel=1e-5), key
    assert logged[6]["tasks/core"] == pytest.approx(cli["core"], rel=1e-6)


def test_plot_draws_task_curves_next_to_the_loss(tmp_path):
    import matplotlib.image

    from accel_pretrain.plot import plot

    lines = [{"event": "run", "step": 0, "tokens_per_step": 100}]
    lines += [{"step": s, "tokens": 100 * s, "loss": 5 - s / 10, "lr": 1e-3, "grad_norm": 1.0} for s in range(1, 11)]
    lines += [{"step": s, "tasks/piqa/acc": 0.5 + s / 100, "tasks/piqa/acc_norm": 0.5, "tasks/arc_easy/acc": 0.3,
               "tasks/core": 0.01 * s} for s in (5, 10)]
    for name, rows in (("with", lines), ("without", [r for r in lines if not any(k.startswith("tasks/") for k in r)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with_tasks = matplotlib.image.imread(plot([str(tmp_path / "with")], str(tmp_path / "with.png")))
    without = matplotlib.image.imread(plot([str(tmp_path / "without")], str(tmp_path / "without.png")))
    assert with_tasks.shape[0] > without.shape[0] * 1.25  # a fourth panel: the task accuracies and CORE


def test_local_tasks_keep_lm_evals_own_prompts_and_metrics():
    """Each *_local task builds, on the same documents, exactly the requests, targets and metrics of
    lm-eval's registered task (tests/tasks/check_prompts.py)."""
    sys.path.insert(0, TASKS_DIR)
    try:
        from check_prompts import mismatches
    finally:
        sys.path.remove(TASKS_DIR)
    from tokenization.tasks import task_manager

    result = mismatches(tm=task_manager(TASKS_DIR))
    assert len(result) >= 9 and not any(result.values()), result
