"""Check that the *_local tasks in this folder build exactly the requests of
lm-eval's registered tasks.

The registered task is loaded through lm-eval's own registry (TaskManager) with
`datasets.load_dataset` replaced, for the duration of the load, by one that
returns our slice for every split; both tasks then build their zero-shot
requests and the (request_type, arguments, doc_id, idx) lists are compared,
together with the processed docs, the targets and the metric configuration.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python tests/tasks/check_prompts.py

Needs lm-eval's default task index (about 12-15 s to build on a busy CPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent

# local name -> (dataset_path, dataset_name) of the registered lm-eval 0.4.13 task
REGISTERED = {
    "hellaswag": ("Rowan/hellaswag", None),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "piqa": ("baber/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "boolq": ("aps/super_glue", "boolq"),
    "openbookqa": ("allenai/openbookqa", "main"),
    "sciq": ("allenai/sciq", None),
    "copa": ("aps/super_glue", "copa"),
}
CONFIG_KEYS = ("output_type", "metric_list", "target_delimiter", "fewshot_delimiter", "description")


def _requests(task) -> list:
    task.set_config("num_fewshot", 0)
    task.build_all_requests(rank=0, world_size=1)
    return [(i.request_type, i.arguments, i.doc_id, i.idx) for i in task.instances]


def mismatches(names: list[str] | None = None, tm=None) -> dict[str, list[str]]:  # noqa: ANN001
    """{registered name: [what differs]} for every local task; empty lists when identical. `tm`: a
    TaskManager that indexes this folder, when the caller has one already (its index takes seconds)."""
    from lm_eval.tasks import TaskManager

    names = names or list(REGISTERED)
    by_source = {REGISTERED[n]: n for n in names}

    def fake_load_dataset(path, name=None, **_kw):
        split = datasets.load_from_disk(str(HERE / "data" / by_source[(path, name)] / "validation"), keep_in_memory=True)
        return datasets.DatasetDict({"train": split, "validation": split, "test": split})

    tm = tm or TaskManager(include_path=str(HERE))
    local = tm.load([n + "_local" for n in names])["tasks"]
    real = datasets.load_dataset
    datasets.load_dataset = fake_load_dataset
    try:
        registered = tm.load(names)["tasks"]
    finally:
        datasets.load_dataset = real

    out = {}
    for n in names:
        a, b = local[n + "_local"], registered[n]
        diff = []
        if [dict(d) for d in a.eval_docs] != [dict(d) for d in b.eval_docs]:
            diff.append("processed docs")
        if [a.doc_to_target(d) for d in a.eval_docs] != [b.doc_to_target(d) for d in b.eval_docs]:
            diff.append("targets")
        ca, cb = a.config.to_dict(), b.config.to_dict()
        diff += [f"config {k}" for k in CONFIG_KEYS if ca.get(k) != cb.get(k)]
        ra, rb = _requests(a), _requests(b)
        if not ra or ra != rb:
            diff.append("requests")
        out[n] = diff
    return out


if __name__ == "__main__":
    result = mismatches()
    for name, diff in result.items():
        print(f"{name:14s} {'identical' if not diff else 'DIFFERS: ' + ', '.join(diff)}")
    sys.exit(1 if any(result.values()) else 0)
