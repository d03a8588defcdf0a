"""CLI: loss, perplexity and bits per byte of a model on a data directory's validation split, or its
scores on downstream tasks through lm-evaluation-harness.

    python -m accel_pretrain.evaluate MODEL --data DIR [--block_size T] [--batch_size B] [--max_windows K]
    python -m accel_pretrain.evaluate MODEL --tasks hellaswag,arc_easy,piqa,winogrande [--limit N]
        [--num_fewshot K] [--batch_size B] [--tasks_dir DIR] [--output FILE.json]

MODEL is a run directory, a checkpoint, or a Hugging Face folder or name (Llama, Mistral, Qwen2,
Qwen3). Training's eval calls `score` on the same windows in the run's precision, which is also
evaluate's default, so both report the same numbers; with --tasks, lm-eval's own
task definitions, prompts and metrics score the model (accel_pretrain.downstream), as
`lm_eval --model hf` scores its export."""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tokenization import tasks

from .data import Ids, TokenData, check_same_tokenizer, unigram_loss
from .errors import UserError, run_cli
from .model import attention_mask


@torch.no_grad()
def score(model: torch.nn.Module, ids: Ids, block_size: int, batch_size: int, max_windows: int | None,
          device: torch.device, rank: int = 0, world: int = 1, eos_token_id: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target losses in nats, number of targets) over this rank's share of the windows; with
    eos_token_id, each token attends only within its own document (attention_mask).

    Every rank runs the same number of forwards (padding with weight-0 windows) so sharded models
    (FSDP) never wait on a rank that has finished."""
    all_starts = ids.eval_starts(block_size, max_windows)
    starts = all_starts[rank::world]
    per_rank = math.ceil(len(all_starts) / world)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for b in range(0, per_rank, batch_size):
        chosen = starts[b:b + batch_size]
        weight = 1.0
        if len(chosen) == 0:
            chosen, weight = all_starts[:1], 0.0
        xy = ids.windows(chosen, block_size).to(device)
        x = xy[:, :-1]
        logits, _ = model(x, None, attention_mask(x, eos_token_id))
        losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), xy[:, 1:].reshape(-1), reduction="sum")
        loss_sum += weight * losses.double()
        count += weight * xy[:, 1:].numel()
    model.train(was_training)
    return loss_sum, count


def metrics(loss_sum: float, count: float, bytes_per_token: float | None) -> dict[str, float]:
    loss = loss_sum / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
    if bytes_per_token:
        out["bits_per_byte"] = loss / math.log(2) / bytes_per_token
    out["tokens"] = int(count)
    return out


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RUN_PRECISION = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}  # a run's mixed_precision -> --precision


def autocast_for(choice: str, state: dict[str, Any], device: torch.device) -> tuple[Callable[[], Any], str]:
    """The context the forwards run in and its name, printed with why: by default the run's own
    precision (its eval ran under the same autocast, so the numbers reproduce its log), fp32 for a
    model that is not a run of ours."""
    if choice == "run":
        trained = state.get("config", {}).get("mixed_precision")
        choice, why = (RUN_PRECISION.get(trained, "fp32"), "the run's") if trained else ("fp32", "not a run of ours")
    else:
        why = "--precision"
    if choice == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU (on a CPU, use bf16 or fp32)")
    dtype = PRECISIONS[choice]
    name = f"{choice} autocast" if dtype else "fp32"
    print(f"precision: {name} ({why})", file=sys.stderr)
    if dtype is None:
        return nullcontext, name
    return lambda: torch.autocast(device.type, dtype=dtype), name


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import load_any

    p = argparse.ArgumentParser(prog="python -m accel_pretrain.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint, or Hugging Face folder/name (Llama, Mistral, Qwen2, "
                                  "Qwen3)")
    p.add_argument("--data",
                   help="prepared data directory (reads valid_ids.npy), or a mixture DIR:WEIGHT,DIR:WEIGHT as "
                        "training takes it: with --max_windows K each source gives its first windows in proportion "
                        "to its weight (training's eval: K = eval_iters x micro_batch_size, so --max_windows K "
                        "reproduces train_log.jsonl's val_loss), without it every window of every source counts")
    p.add_argument("--block_size", type=int, default=None, help="window length (default: the run's block_size, else 256)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="windows or requests per forward (default: the run's micro_batch_size, else 8)")
    p.add_argument("--max_windows", type=int, default=None,
                   help="score only the first K windows (shared out by weight in a mixture)")
    p.add_argument("--document_masking", action="store_true",
                   help="attend only within each document of a window, as a run trained with it does")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks, groups or tags (instead of --data), e.g. "
                                   "hellaswag,arc_easy,piqa,winogrande")
    p.add_argument("--limit", type=int, default=None, help="--tasks: score only the first N documents of each task")
    p.add_argument("--num_fewshot", type=int, default=None, help="--tasks: examples in each prompt (task default)")
    p.add_argument("--tasks_dir", default=None, help="--tasks: a folder of task YAMLs of your own (e.g. on local data)")
    p.add_argument("--output", default="downstream.json", help="--tasks: where the JSON of the scores goes")
    p.add_argument("--precision", choices=["run", *PRECISIONS], default="run",
                   help="the forwards' precision: the run's own (default; fp32 for a model that is not a run of "
                        "ours), or fp32, bf16 or fp16 autocast")
    args = p.parse_args(argv)
    if args.tasks and args.data:
        raise UserError("--tasks scores downstream tasks and --data the validation loss: run them as two commands")
    if args.tasks:
        return evaluate_tasks(args)
    if not args.data:
        raise UserError("pass --data DIR (validation loss) or --tasks NAMES (downstream tasks)")
    data = TokenData(args.data)
    model, tokenizer, state = load_any(args.model)
    check_same_tokenizer(data, tokenizer, "the model")
    block = args.block_size or state.get("config", {}).get("block_size", 256)
    args.batch_size = args.batch_size or state.get("config", {}).get("micro_batch_size", 8)
    if block < 1 or args.batch_size < 1 or (args.max_windows is not None and args.max_windows < 1):
        raise UserError("--block_size, --batch_size and --max_windows must be at least 1")
    if data.valid.shortest() < block + 1:
        raise UserError(f"block_size {block} needs at least {block + 1} validation tokens; {args.data} has "
                        f"{data.valid.shortest()}: pass a smaller --block_size")
    if block > model.config.max_position_embeddings:
        raise UserError(f"--block_size {block} exceeds the model's max_position_embeddings "
                        f"{model.config.max_position_embeddings}")
    data.check_ids_below(model.config.vocab_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast, precision = autocast_for(args.precision, state, device)
    eos = data.meta.get("eos_token_id") if args.document_masking else None
    with autocast():
        loss_sum, count = score(model.to(device), data.valid, block, args.batch_size, args.max_windows, device,
                                eos_token_id=eos)
    result = metrics(loss_sum.item(), count.item(), data.bytes_per_token) | {"precision": precision}
    targets = data.valid.windows(data.valid.eval_starts(block, args.max_windows), block)[:, 1:].numpy()
    result["unigram_loss"] = unigram_loss(data.train, targets, model.config.vocab_size)
    print(json.dumps(result))
    return 0


def evaluate_tasks(args: argparse.Namespace) -> int:
    """--tasks: the model's scores on lm-eval tasks, a table on stdout and the JSON in --output."""
    from transformers import AutoTokenizer

    from .checkpoint import load_any
    from .downstream import contamination, load_tasks, run_tasks, table, warn_contaminated

    names = tasks.task_list(args.tasks)
    if (args.batch_size or 1) < 1 or (args.limit is not None and args.limit < 1) or (args.num_fewshot or 0) < 0:
        raise UserError("--batch_size and --limit must be at least 1, --num_fewshot at least 0")
    load_tasks(names, args.tasks_dir)  # unknown names and offline data are refused before the model loads
    model, tokenizer, state = load_any(args.model)
    args.batch_size = args.batch_size or state.get("config", {}).get("micro_batch_size", 8)
    if tokenizer is None:
        raise UserError(f"no tokenizer found next to {args.model}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast, precision = autocast_for(args.precision, state, device)
    from .task_lm import TaskLM  # lm-eval is there: load_tasks checked

    lm = TaskLM(model.to(device).eval(), AutoTokenizer.from_pretrained(tokenizer), args.batch_size, device,
                autocast=autocast, progress=True)
    scores = run_tasks(lm, names, args.tasks_dir, args.limit, args.num_fewshot)
    scores["config"] = {"model": args.model, "tasks": names, "limit": args.limit, "num_fewshot": args.num_fewshot,
                        "precision": precision}
    scores["contaminated"] = contamination(state.get("config", {}).get("data"), list(scores["results"]))
    print(table(scores))
    for line in warn_contaminated(scores["contaminated"]):
        print(line, file=sys.stderr)
    Path(args.output).write_text(json.dumps(scores, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
