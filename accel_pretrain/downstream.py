"""Downstream benchmarks through lm-evaluation-harness: our model behind lm-eval's LM interface, so
lm-eval's own task definitions, prompts and metrics score it, with no export to disk.

`TaskLM` reproduces what lm-eval's Hugging Face model (`lm_eval --model hf`) computes: the same
encoding of context and continuation (TemplateLM), inputs cut from the left to max_length,
log-probabilities in fp32 of the continuation's tokens and whether each is the greedy choice,
lm-eval's rolling windows for perplexity tasks, and greedy decoding (our KV-cache decoder) cut at
the task's stop sequences. Under several processes lm-eval gives each rank a share of the
documents and pads the requests so every rank runs as many forwards; the rank's results are
gathered on rank 0 (tests compare with one process and with lm-eval's own model on an export)."""
from __future__ import annotations

import contextlib
import difflib
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import UserError

PIP_LINE = "pip install 'accel-pretrain[eval]' (or pip install lm-eval)"


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"downstream tasks need lm-evaluation-harness: {PIP_LINE}") from None


def make_task_lm(model: torch.nn.Module, tokenizer: Any, batch_size: int, device: torch.device, rank: int = 0,
                 world: int = 1, autocast: Callable[[], Any] = contextlib.nullcontext):  # noqa: ANN201
    """A TaskLM (defined here so that importing this module does not import lm-eval)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class TaskLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tokenizer, self.batch_size, self._device = model, tokenizer, batch_size, device
            self._rank, self._world_size = rank, world
            self.max_length = model.config.max_position_embeddings

        @property
        def device(self) -> torch.device:
            return self._device

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(self.tokenizer.name_or_path).replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                special = {"add_special_tokens": False}
            return self.tokenizer.encode(string, **special)

        def logprobs(self, inputs: list[list[int]]) -> torch.Tensor:
            """log_softmax in fp32 of the model's logits for right-padded inputs (B, T, vocab)."""
            width = max(len(t) for t in inputs)
            x = torch.tensor([t + [0] * (width - len(t)) for t in inputs], dtype=torch.long, device=self.device)
            with torch.no_grad(), autocast():
                logits, _ = self.model(x)
            return F.log_softmax(logits.float(), dim=-1)

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                                  ) -> list[tuple[float, bool]]:
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            for b in range(0, len(order), self.batch_size):
                chosen = order[b:b + self.batch_size]
                inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):][:-1] for i in chosen]
                logprobs = self.logprobs(inputs)
                for i, inp, lp in zip(chosen, inputs, logprobs):
                    cont = requests[i][2]
                    scored = lp[len(inp) - len(cont):len(inp)]
                    target = torch.tensor(cont, device=self.device)
                    greedy = bool((scored.argmax(-1) == target).all())
                    results[i] = (float(scored.gather(1, target[:, None]).sum()), greedy)
            return results

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            windows, counts = [], []
            for (text,) in (r.args for r in requests):
                rolling = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                windows += [(None,) + w for w in rolling]
                counts.append(len(rolling))
            pad = 0
            if self.world_size > 1:  # every rank runs as many forwards (FSDP shards need all of them)
                sizes = self.all_gather(torch.tensor(len(windows), device=self.device)).tolist()
                pad = max(sizes) - len(windows)
                windows += [windows[0]] * pad
            scores = self._loglikelihood_tokens(windows)
            scores = scores[:len(scores) - pad]
            totals, at = [], 0
            for n in counts:
                totals.append(sum(s for s, _ in scores[at:at + n]))
                at += n
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            from .generate import generate

            eos = self.tokenizer.decode(self.eot_token_id)
            out = []
            for context, gen_kwargs in (r.args for r in requests):
                kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                new_tokens = kwargs.pop("max_gen_toks")
                ids = self.tok_encode(context)[-(self.max_length - new_tokens):]
                with autocast():
                    new = generate(self.model, torch.tensor([ids], device=self.device), new_tokens,
                                   temperature=float(kwargs.get("temperature") or 0.0), top_k=0, top_p=1.0,
                                   eos_token_id=self.eot_token_id)[0]
                out.append(postprocess_generated_text(self.tokenizer.decode(new, skip_special_tokens=True), until,
                                                      None))
            return out

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self.world_size == 1:
                return tensor[None]
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.stack(parts)

        def gather_object(self, obj: Any, dst: int = 0) -> list | None:
            if self.world_size == 1:
                return [obj]
            result = [None] * self.world_size if self.rank == dst else None
            torch.distributed.gather_object(obj, result, dst=dst)
            return result

        def barrier(self) -> None:
            if self.world_size > 1:
                torch.distributed.barrier()

    return TaskLM()


def load_tasks(names: list[str], tasks_dir: str | None) -> tuple[Any, dict[str, Any]]:
    """lm-eval's TaskManager and the named tasks (groups and tags expand), each refused in one line
    when unknown (with the closest names) or when its data cannot be had offline."""
    require_lm_eval()
    if tasks_dir and not Path(tasks_dir).is_dir():
        raise UserError(f"--tasks_dir {tasks_dir} is not a directory")
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
def task_manager(tasks_dir: str | None):  # noqa: ANN201
    """lm-eval's index of its 14,000-odd tasks (and tasks_dir's), built once per process: about 10 s."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir) if tasks_dir else TaskManager()


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

    import datasets

    datasets.disable_progress_bars()
    manager, loaded = load_tasks(names, tasks_dir)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet) if lm.rank else contextlib.nullcontext():
        out = lm_eval.evaluator.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
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
