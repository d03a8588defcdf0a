"""Downstream benchmarks through lm-evaluation-harness: lm-eval's own task definitions, prompts and
metrics score our model (task_lm.TaskLM) with no export to disk. This module names and loads the
tasks (one-line refusals), runs lm-eval, and turns its results into a table, CORE and log metrics.
lm-eval is imported inside the functions, so that it stays an optional dependency."""
from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
from pathlib import Path
from typing import Any

from .errors import UserError

PIP_LINE = "pip install 'accel-pretrain[eval]' (or pip install lm-eval)"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"downstream tasks need lm-evaluation-harness: {PIP_LINE}") from None


def load_tasks(names: list[str], tasks_dir: str | None) -> tuple[Any, dict[str, Any]]:
    """lm-eval's TaskManager and the named tasks (groups and tags expand), each refused in one line
    when unknown (with the closest names) or when its data cannot be had offline. Loaded once per
    process: a run that scores every few hundred steps reads each task's data once."""
    return _load_tasks(tuple(names), tasks_dir)


@functools.cache
def _load_tasks(names: tuple[str, ...], tasks_dir: str | None) -> tuple[Any, dict[str, Any]]:
    require_lm_eval()
    import datasets

    datasets.disable_progress_bars()  # the output a user reads is ours: no "Map:" or "Generating split" bars
    names = list(names)
    if tasks_dir and not Path(tasks_dir).is_dir():
        raise UserError(f"--tasks_dir {tasks_dir} is not a directory")
    manager = task_manager(tasks_dir, defaults=False) if tasks_dir else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # lm-eval's own tasks, or a mistake
        manager = task_manager(tasks_dir)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            raise UserError(f"unknown task {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                      " (python -m lm_eval ls tasks lists them)"))
    try:
        loaded = manager.load(names)
    except ConnectionError as e:
        raise UserError(f"task data is not available offline ({str(e).splitlines()[0][:200]}); write task YAMLs "
                        "that read local files into a folder and pass --tasks_dir DIR (the repository's tests/tasks/ "
                        "shows how)") from None
    return manager, loaded


@functools.cache
def task_manager(tasks_dir: str | None, defaults: bool = True):  # noqa: ANN201
    """lm-eval's index of its 14,000-odd tasks (and tasks_dir's), built once per process: about 10 s.
    With defaults=False tasks_dir's alone: a fraction of a second, enough when every task named is there."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir, include_defaults=defaults) if tasks_dir else TaskManager()


def chance(task: Any, limit: int | None) -> float | None:
    """A multiple-choice task's random baseline on the documents scored: the mean of 1 / choices."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return None
    docs = list(task.eval_docs)[:limit] if limit else list(task.eval_docs)
    return sum(1 / len(task.doc_to_choice(d)) for d in docs) / len(docs) if docs else None


def core_score(results: dict[str, dict[str, Any]], baselines: dict[str, float | None]) -> float | None:
    """nanochat's CORE: the mean over tasks of (acc - random) / (1 - random), over tasks with a
    random baseline (multiple choice); None with fewer than two such tasks."""
    centered = [(results[t]["acc,none"] - r) / (1 - r) for t, r in baselines.items()
                if r is not None and r < 1 and "acc,none" in results.get(t, {})]
    return sum(centered) / len(centered) if len(centered) >= 2 else None


def run_tasks(lm: Any, names: list[str], tasks_dir: str | None, limit: int | None, num_fewshot: int | None,
              ) -> dict[str, Any] | None:
    """lm-eval on `lm`; on rank 0 {"results": {task: {metric: value}}, "random": {...}, "core": x,
    "n_samples": {...}}, elsewhere None."""
    import lm_eval.evaluator

    manager, loaded = load_tasks(names, tasks_dir)
    # the tasks and groups already built (their data read once); a tag's name is expanded again
    built = [loaded["groups"].get(n) or loaded["tasks"].get(n) for n in names]
    tasks = built if all(built) else names
    # lm-eval records the git hash of the working directory by running git, whose "fatal: not a git
    # repository" would reach our output; we do not report it
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet) if lm.rank else contextlib.nullcontext():
        out = lm_eval.evaluator.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                                task_manager=manager, bootstrap_iters=1000, log_samples=False,
                                                verbosity="ERROR", random_seed=None, numpy_random_seed=None,
                                                torch_random_seed=None)  # leave the run's RNG alone (greedy: no use)
    if out is None:
        return None
    results = {t: {k: v for k, v in r.items() if k not in ("alias", "name", "sample_len")}
               for t, r in out["results"].items()}
    baselines = {name: chance(task, limit) for name, task in loaded["tasks"].items()}
    return {"results": results, "random": baselines, "core": core_score(results, baselines),
            "n_samples": out.get("n-samples", {}), "n_shot": out.get("n-shot", {})}


def table(scores: dict[str, Any]) -> str:
    """task | metric | value | stderr | random, one line per metric."""
    rows = [("task", "metric", "value", "stderr", "random")]
    for task, metrics in sorted(scores["results"].items()):
        for key, value in sorted(metrics.items()):
            if "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            random = scores["random"].get(task) if metric in ("acc", "acc_norm") else None
            rows.append((task, metric, f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, float) else "",
                         f"{random:.4f}" if random is not None else ""))
    if scores.get("core") is not None:
        rows.append(("CORE", "centered acc", f"{scores['core']:.4f}", "", "0.0000"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def flat_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """{"tasks/hellaswag/acc": 0.31, ..., "tasks/core": 0.05} for train_log.jsonl and trackers."""
    flat = {f"tasks/{t}/{k.split(',')[0]}": v for t, m in scores["results"].items() for k, v in m.items()
            if "_stderr" not in k and isinstance(v, (int, float)) and math.isfinite(v)}
    if scores.get("core") is not None:
        flat["tasks/core"] = scores["core"]
    return flat
