"""Dataset loader for the offline task YAMLs in this folder.

lm-eval calls a task's `custom_dataset` as
`custom_dataset(**metadata, **dataset_kwargs)` (lm_eval/api/task.py,
ConfigurableTask.download) instead of `datasets.load_dataset`.  The YAMLs name
this function with `!function local_data.load`, which lm-eval resolves next to
the YAML, so the data folder is found from this file and not from the current
directory (a relative `data_files` for `load_dataset("arrow", ...)` is resolved
against the current directory).
"""

from __future__ import annotations

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load(*, local_data: str, **_ignored) -> datasets.DatasetDict:
    """Return {"validation": Dataset} for tests/tasks/data/<local_data>/validation.

    In memory, so that `process_docs` (a `Dataset.map`) writes no cache-*.arrow
    files into the data folder.
    """
    split_dir = DATA / local_data / "validation"
    return datasets.DatasetDict({"validation": datasets.load_from_disk(str(split_dir), keep_in_memory=True)})
