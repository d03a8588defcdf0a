"""What --eval_tasks costs as a share of training time, measured in one run: optimizer steps of a
preset (the baseline) and lm-eval scoring of the same model, per document of each task.

    python benchmarks/tasks_cost.py --data DIR [--preset mini] [--block_size 256] [--micro_batch_size 8]
        [--steps 20] [--tasks hellaswag_local,arc_easy_local] [--tasks_dir tests/tasks] [--limit 40]
        [--interval 500] [--task_limit 500]

Prints seconds per optimizer step, seconds per scored document of each task, and the share of a
run's time that scoring --task_limit documents of each task every --interval steps takes (the
defaults of --eval_tasks_limit and --eval_tasks_interval, which is save_interval's 500)."""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine  # noqa: E402

from accel_pretrain.config import PRESETS, ModelConfig, TrainConfig  # noqa: E402
from accel_pretrain.data import TokenData, step_windows  # noqa: E402
from accel_pretrain.downstream import run_tasks  # noqa: E402
from accel_pretrain.task_lm import TaskLM  # noqa: E402
from accel_pretrain.model import Transformer  # noqa: E402
from accel_pretrain.optim import build_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="mini", choices=list(PRESETS))
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tasks", default="hellaswag_local,arc_easy_local")
    p.add_argument("--tasks_dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "tasks"))
    p.add_argument("--limit", type=int, default=40, help="documents of each task timed")
    p.add_argument("--interval", type=int, default=500)
    p.add_argument("--task_limit", type=int, default=500)
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers import AutoTokenizer

    data = TokenData(args.data)
    cfg = TrainConfig(block_size=args.block_size, micro_batch_size=args.micro_batch_size,
                      model=ModelConfig(**PRESETS[args.preset], vocab_size=data.vocab_size))
    cfg.validate()
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg, fused=False)
    times = []
    for step in range(args.steps + 2):
        t = time.perf_counter()
        xy = step_windows(data.train, cfg.micro_batch_size, cfg.block_size, 0, step, 0)
        _, loss = model(xy[:, :-1], xy[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times[2:])
    tokenizer = AutoTokenizer.from_pretrained(str(data.dir / "tokenizer"))
    lm = TaskLM(model.eval(), tokenizer, cfg.micro_batch_size, torch.device("cpu"))
    names = args.tasks.split(",")
    print(f"{args.preset}, block {args.block_size}, micro-batch {args.micro_batch_size}, fp32, {machine()}")
    print(f"optimizer step (the baseline): {step_s:.3f} s (median of {args.steps})")
    per_doc, fixed = {}, {}
    for name in names:
        took = {}
        for limit in (2, args.limit, 2):  # the first call also loads what later calls reuse
            t = time.perf_counter()
            with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # lm-eval's progress bars
                run_tasks(lm, [name], args.tasks_dir, limit, None)
            took[limit] = time.perf_counter() - t
        per_doc[name] = (took[args.limit] - took[2]) / (args.limit - 2)
        fixed[name] = took[2] - 2 * per_doc[name]
        print(f"{name}: {per_doc[name] * 1000:.1f} ms per document + {fixed[name]:.1f} s per scoring (task setup)")
    scoring = sum(per_doc.values()) * args.task_limit + sum(fixed.values())
    share = scoring / (scoring + args.interval * step_s)
    print(f"scoring {args.task_limit} documents of each task every {args.interval} steps: {scoring:.1f} s per "
          f"{args.interval * step_s:.1f} s of training = {share:.1%} of the run's time")


if __name__ == "__main__":
    main()
