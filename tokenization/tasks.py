"""lm-eval's tasks by name: the one loader shared by prepare's decontamination and evaluate's scoring,
so the documents checked for overlap are the documents scored. lm-eval is imported inside the
functions, so that it stays an optional dependency."""
from __future__ import annotations

import difflib
import functools
import logging
from pathlib import Path
from typing import Any

from . import PrepareError

PIP_LINE = "pip install 'accel-pretrain[eval]' (or pip install lm-eval)"


def task_list(spec: str | None) -> list[str]:
    """"hellaswag, arc_easy" -> ["hellaswag", "arc_easy"]: the comma-separated names every CLI takes."""
    return [n.strip() for n in (spec or "").split(",") if n.strip()]


def require_lm_eval(what: str = "downstream tasks") -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise PrepareError(f"{what} need lm-evaluation-harness: {PIP_LINE}") from None


@functools.cache
def load_tasks(names: tuple[str, ...], tasks_dir: str | None) -> tuple[Any, dict[str, Any]]:
    """lm-eval's TaskManager and the named tasks (groups and tags expand), each refused in one line
    when unknown (with the closest names) or when its data cannot be had offline. Loaded once per
    process: a run that scores every few hundred steps reads each task's data once."""
    require_lm_eval()
    import datasets

    datasets.disable_progress_bars()  # the output a user reads is ours: no "Map:" or "Generating split" bars
    if tasks_dir and not Path(tasks_dir).is_dir():
        raise PrepareError(f"--tasks_dir {tasks_dir} is not a directory")
    manager = task_manager(tasks_dir, defaults=False) if tasks_dir else None
    if manager is None or not set(names) <= set(manager.all_tasks):  # lm-eval's own tasks, or a mistake
        manager = task_manager(tasks_dir)
    refuse_unknown(names, manager.all_tasks)
    lm_eval_log = logging.getLogger("lm_eval")
    level = lm_eval_log.level
    lm_eval_log.setLevel(logging.ERROR)  # its notes on task configs are not for our users
    try:
        loaded = manager.load(list(names))
    except ConnectionError as e:
        raise PrepareError(f"task data is not available offline ({str(e).splitlines()[0][:200]}); write task YAMLs "
                           "that read local files into a folder and pass --tasks_dir DIR (the repository's "
                           "tests/tasks/ shows how)") from None
    finally:
        lm_eval_log.setLevel(level)
    return manager, loaded


def refuse_unknown(names: tuple[str, ...], known: list[str]) -> None:
    """One line for a name that is not a task, with the closest names."""
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            raise PrepareError(f"unknown task {name!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                         " (python -m lm_eval ls tasks lists them)"))


@functools.cache
def task_manager(tasks_dir: str | None, defaults: bool = True):  # noqa: ANN201
    """lm-eval's index of its 14,000-odd tasks (and tasks_dir's), built once per process: about 10 s.
    With defaults=False tasks_dir's alone: a fraction of a second, enough when every task named is there."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir, include_defaults=defaults) if tasks_dir else TaskManager()
