"""`evaluate --tasks` against lm-eval's own Hugging Face model (`lm_eval --model hf`) on the same
folder, tasks, documents and batch, timed in one process: the baseline is HFLM.

    python benchmarks/evaluate_vs_hflm.py --tokenizer ../shared/tokenizers/gpt2 [--shape smollm2-135m]
        [--tasks hellaswag_local,arc_easy_local,piqa_local] [--tasks_dir tests/tasks] [--limit 40]
        [--batch_size 16] [--repeats 2]

The model is a Llama of SmolLM2-135M's shape with random weights and the tokenizer's vocabulary
(the time of a forward does not depend on the weights' values). Each side runs --repeats times,
alternating; the best of each is compared, and the scores must agree. With --cli each side is the
command a user types, a process of its own (imports, task index and model loading included):
`python -m accel_pretrain.evaluate FOLDER --tasks ...` against `python -m lm_eval --model hf ...`."""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine  # noqa: E402

SHAPES = {"smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
                               rope_theta=100000.0)}


def build(folder: Path, tokenizer: str, shape: str) -> None:
    """A random Llama of the named shape with the tokenizer's vocabulary, saved with that tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, **SHAPES[shape]))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def ours(folder: Path, names: list[str], tasks_dir: str, limit: int, batch: int) -> dict:
    from transformers import AutoTokenizer

    from accel_pretrain.checkpoint import load_any
    from accel_pretrain.downstream import run_tasks
    from accel_pretrain.task_lm import TaskLM

    model, tokenizer, _ = load_any(str(folder))
    lm = TaskLM(model.eval(), AutoTokenizer.from_pretrained(tokenizer), batch, torch.device("cpu"))
    return run_tasks(lm, names, tasks_dir, limit, None)["results"]


def theirs(folder: Path, names: list[str], tasks_dir: str, limit: int, batch: int) -> dict:
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM

    from accel_pretrain.downstream import load_tasks

    manager, _ = load_tasks(names, tasks_dir)
    out = lm_eval.evaluator.simple_evaluate(model=HFLM(pretrained=str(folder), batch_size=batch, device="cpu"),
                                            tasks=names, limit=limit, task_manager=manager, verbosity="ERROR")
    return {t: {k: v for k, v in r.items() if k not in ("alias", "name", "sample_len")} for t, r in out["results"].items()}


def commands(folder: Path, names: list[str], tasks_dir: str, limit: int, batch: int, out: Path) -> dict[str, list]:
    ours = [sys.executable, "-m", "accel_pretrain.evaluate", str(folder), "--tasks", ",".join(names), "--tasks_dir",
            tasks_dir, "--limit", str(limit), "--batch_size", str(batch), "--output", str(out / "ours.json")]
    theirs = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks",
              ",".join(names), "--include_path", tasks_dir, "--limit", str(limit), "--batch_size", str(batch),
              "--device", "cpu"]
    return {"ours": ours, "hflm": theirs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder or hub name")
    p.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--tasks", default="hellaswag_local,arc_easy_local,piqa_local")
    p.add_argument("--tasks_dir", default=str(Path(__file__).resolve().parents[1] / "tests" / "tasks"))
    p.add_argument("--limit", type=int, default=40, help="documents of each task")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cli", action="store_true", help="time the two commands as processes")
    args = p.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    names = args.tasks.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp), args.tokenizer, args.shape)
        times: dict[str, list[float]] = {"ours": [], "hflm": []}
        scores = {}
        for _ in range(args.repeats):
            for side, fn in (("ours", ours), ("hflm", theirs)):
                t = time.perf_counter()
                if args.cli:
                    cmd = commands(Path(tmp), names, args.tasks_dir, args.limit, args.batch_size, Path(tmp))[side]
                    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                else:
                    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # progress bars
                        scores[side] = fn(Path(tmp), names, args.tasks_dir, args.limit, args.batch_size)
                times[side].append(time.perf_counter() - t)
    if args.cli:
        best = {side: min(t) for side, t in times.items()}
        print(f"{args.shape} (random weights), {len(names)} tasks x {args.limit} documents, batch {args.batch_size}, "
              f"fp32, {machine()}, torch {torch.__version__}; each command a process")
        print(f"python -m accel_pretrain.evaluate: {best['ours']:.1f} s | lm_eval --model hf: {best['hflm']:.1f} s "
              f"(best of {args.repeats} each) | ratio lm_eval / ours {best['hflm'] / best['ours']:.2f}")
        return
    for task in names:
        a, b = scores["ours"][task].get("acc,none"), scores["hflm"][task].get("acc,none")
        if a != b:
            raise SystemExit(f"scores differ on {task}: ours {a}, HFLM {b}")
    best = {side: min(t) for side, t in times.items()}
    print(f"{args.shape} (random weights, vocabulary of {args.tokenizer}), {len(names)} tasks x {args.limit} "
          f"documents, batch {args.batch_size}, fp32, {machine()}, torch {torch.__version__}")
    print(f"evaluate --tasks (TaskLM): {best['ours']:.1f} s | lm-eval HFLM: {best['hflm']:.1f} s (best of "
          f"{args.repeats} each) | ratio HFLM / ours {best['hflm'] / best['ours']:.2f}; acc equal on every task")


if __name__ == "__main__":
    main()
