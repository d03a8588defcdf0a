"""CLI: train_log.jsonl -> PNG of training and validation loss against tokens seen, with the
gradient norm and the learning rate below (where a run diverges shows in all three: spikes and
non-finite steps are marked), and, for runs with --eval_tasks, each task's accuracy and the CORE
score next to the loss; one colour per run, so runs can be compared.

    python -m accel_pretrain.plot RUN [RUN ...] [--out loss.png]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError, run_cli
from .tracking import read_log


def plot(runs: list[str], out: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {run: read_run(run) for run in runs}
    tasks = any(task_keys(log) for log in logs.values())
    fig, axes = plt.subplots(4 if tasks else 3, 1, figsize=(9, 10.5 if tasks else 8), sharex=True,
                             height_ratios=(3, 2, 1.2, 1) if tasks else (3, 1.2, 1))
    ax_loss, ax_norm, ax_lr = axes[0], axes[-2], axes[-1]
    for i, (run, log) in enumerate(logs.items()):
        tokens_per_step = next((r["tokens_per_step"] for r in log if "tokens_per_step" in r), 1)
        train = [r for r in log if "loss" in r]
        evals = [r for r in log if "val_loss" in r]
        color = f"C{i}"
        name = Path(run).name
        ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], color=color, alpha=0.45, lw=1,
                     label=f"{name} train")
        ax_loss.plot([r["step"] * tokens_per_step for r in evals], [r["val_loss"] for r in evals], "o-",
                     color=color, lw=2, ms=4, label=f"{name} validation")
        ax_norm.plot([r["tokens"] for r in train], [r["grad_norm"] for r in train], color=color, lw=1)
        ax_lr.plot([r["tokens"] for r in train], [r["lr"] for r in train], color=color)
        for j, key in enumerate(task_keys(log)):
            scored = [r for r in log if key in r]
            axes[1].plot([r["step"] * tokens_per_step for r in scored], [r[key] for r in scored], marker="o", color=color,
                         ms=3, lw=2.5 if key == "tasks/core" else 1, ls=("-", "--", ":", "-.")[j % 4],
                         label=f"{name} {key[len('tasks/'):].replace('/acc', '')}")
        for event, marker in (("spike", "v"), ("nonfinite", "x")):
            steps = [r["step"] for r in log if r.get("event") == event]
            at = [next((t for t in train if t["step"] == s), None) for s in steps]
            ax_loss.plot([s * tokens_per_step for s in steps], [t["loss"] if t else ax_loss.get_ylim()[1] for t in at],
                         marker, color="red", ms=9, ls="none", label=f"{name} {event}" if steps else None)
    ax_loss.set_ylabel("cross-entropy (nats)")
    # a step-0 baseline (--eval_at_start) sits at 0 tokens: linear up to one step's tokens, logarithmic beyond
    one_step = min(next((r["tokens_per_step"] for r in log if "tokens_per_step" in r), 1) for log in logs.values())
    ax_loss.set_xscale("symlog", linthresh=one_step)
    ax_loss.grid(True, which="both", alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title("accel-pretrain: loss against tokens seen")
    if tasks:
        axes[1].set_ylabel("task accuracy / CORE")
        axes[1].grid(True, alpha=0.3)
        axes[1].legend(fontsize=7, ncol=2)
    ax_norm.set_ylabel("gradient norm")
    ax_norm.set_yscale("log")
    ax_norm.grid(True, which="both", alpha=0.3)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("tokens seen (log scale)")
    ax_lr.grid(True, alpha=0.3)
    fig.tight_layout()
    out_path = Path(out)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=110)
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out_path


def read_run(run: str) -> list[dict]:
    path = Path(run) / "train_log.jsonl"
    if not path.is_file():
        raise UserError(f"{run} has no train_log.jsonl; pass a run directory written by accel_pretrain.train")
    return read_log(path)


def task_keys(log: list[dict]) -> list[str]:
    """The accuracies (tasks/TASK/acc) and the CORE score a run logged, in first-seen order."""
    keys = dict.fromkeys(k for r in log for k in r if k.startswith("tasks/") and (k.endswith("/acc") or k == "tasks/core"))
    return list(keys)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m accel_pretrain.plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories holding train_log.jsonl")
    p.add_argument("--out", default="loss.png")
    args = p.parse_args(argv)
    print(f"wrote {plot(args.runs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
