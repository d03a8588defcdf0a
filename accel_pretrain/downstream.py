"""Downstream benchmarks through lm-evaluation-harness: lm-eval's own task definitions, prompts and
metrics score our model (task_lm.TaskLM) with no export to disk. This module names and loads the
tasks (one-line refusals), runs lm-eval, and turns its results into a table, CORE and log metrics.
lm-eval is imported inside the functions, so that it stays an optional dependency."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

from tokenization import PrepareError, tasks

from .data import given_weights
from .errors import UserError


def load_tasks(names: list[str], tasks_dir: str | None) -> tuple[Any, dict[str, Any]]:
    """lm-eval's TaskManager and the named tasks, loaded once per process (tokenization.tasks: the
    loader that prepare's decontamination shares); a mistake is refused in one line."""
    try:
        return tasks.load_tasks(tuple(names), tasks_dir)
    except PrepareError as e:
        raise UserError(str(e)) from None


def contamination(data: str | None, names: list[str]) -> dict[str, dict[str, int]]:
    """The tasks among `names` that the training data was found to contain and kept (prepare
    --decontaminate ... --decontaminate_mode report), from its meta.json: {task: {eval_documents_hit,
    train_documents_hit}} over a mixture's directories (an evaluation document found in two of them
    counted once). Unreadable data says nothing."""
    hits: dict[str, set[int]] = {}
    train: dict[str, int] = {}
    for path, _ in given_weights(data) if data else []:
        try:
            meta = json.loads((Path(path) / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        for task, c in meta.get("contamination", {}).items():
            if task in names and c.get("mode") == "report" and c.get("train_documents_hit"):
                hits.setdefault(task, set()).update(c["eval_hits"])
                train[task] = train.get(task, 0) + c["train_documents_hit"]
    return {t: {"eval_documents_hit": len(hits[t]), "train_documents_hit": train[t]} for t in hits}


def warn_contaminated(found: dict[str, dict[str, int]]) -> list[str]:
    """One warning line per contaminated task, for evaluate and --eval_tasks."""
    return [f"warning: {task}: the training data contains {c['eval_documents_hit']} of its documents (in "
            f"{c['train_documents_hit']} training documents; prepare --decontaminate found them), so its score "
            "overstates the model" for task, c in sorted(found.items())]


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
    # repository" would reach our output, and torch's collect_env report (pip list, lscpu: half a second
    # of subprocesses at every scoring during training); we report neither
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    lm_eval.evaluator.add_env_info = lambda results: None
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet) if lm.rank else contextlib.nullcontext(), \
            request_bars(lm.progress):
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


@contextlib.contextmanager
def request_bars(shown: bool) -> Iterator[None]:
    """lm-eval's bar over each task's documents as it builds the requests (it takes no switch), shown
    with ours only: not on other ranks, nor between the log lines of a training."""
    import lm_eval.api.task

    bar = lm_eval.api.task.tqdm
    if not shown:
        lm_eval.api.task.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        lm_eval.api.task.tqdm = bar


def table(scores: dict[str, Any]) -> str:
    """task | metric | value | stderr | random, one line per metric; a task the training data was
    found to contain is marked where its score is read."""
    rows = [("task", "metric", "value", "stderr", "random")]
    for task, metrics in sorted(scores["results"].items()):
        name = f"{task} [contaminated]" if task in scores.get("contaminated", {}) else task
        for key, value in sorted(metrics.items()):
            if "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(key.replace(",", "_stderr,", 1))
            random = scores["random"].get(task) if metric in ("acc", "acc_norm") else None
            rows.append((name, metric, f"{value:.4f}", f"{stderr:.4f}" if isinstance(stderr, float) else "",
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
