"""Our model behind lm-eval's LM interface, so lm-eval's own tasks score it with no export to disk.
Imports lm-eval at its top: evaluate and train import this module only when tasks are scored.

`TaskLM` reproduces what lm-eval's Hugging Face model (`lm_eval --model hf`) computes: the same
encoding of context and continuation (TemplateLM), inputs cut from the left to max_length,
log-probabilities in fp32 of the continuation's tokens and whether each is the greedy choice,
lm-eval's rolling windows for perplexity tasks, and greedy decoding (our KV-cache decoder) cut at
the task's stop sequences. Under several processes lm-eval gives each rank a share of the
documents and pads the requests so every rank runs as many forwards; the rank's results are
gathered on rank 0 (tests compare with one process and with lm-eval's own model on an export)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class TaskLM(TemplateLM):
    """Our model behind lm-eval's LM interface (the module's docstring says what it reproduces);
    `autocast` gives the context its forwards run in: the run's precision."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, batch_size: int, device: torch.device, rank: int = 0,
                 world: int = 1, autocast: Callable[[], Any] = contextlib.nullcontext, progress: bool = False) -> None:
        super().__init__()
        self.model, self.tokenizer, self.batch_size, self._device = model, tokenizer, batch_size, device
        self._rank, self._world_size = rank, world
        self.autocast = autocast
        self.progress = progress and rank == 0  # a bar over the requests, as lm-eval's own models show
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
        with torch.no_grad(), self.autocast():
            logits, _ = self.model(x)
        return F.log_softmax(logits.float(), dim=-1)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's tokenizing of the requests, with its bar only where ours is shown (not between
        the log lines of a training)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """Requests whose inputs are the same tokens (a context with one-token continuations: each
        choice's last token is the one scored) share one forward, as lm-eval's HF model's logits cache
        does; longest first, in batches. Under several processes every rank runs as many forwards
        as the rank with the most (FSDP's shards need all ranks in every forward)."""
        inputs = [tuple((r[1] + r[2])[-(self.max_length + 1):][:-1]) for r in requests]
        unique = sorted(set(inputs), key=lambda t: (-len(t), t))
        batches = [unique[b:b + self.batch_size] for b in range(0, len(unique), self.batch_size)]
        if self.world_size > 1:
            most = int(self.all_gather(torch.tensor(len(batches), device=self.device)).max())
            batches += [[unique[0] if unique else (self.prefix_token_id,)]] * (most - len(batches))
        wanted: dict[tuple[int, ...], list[int]] = {}
        for i, inp in enumerate(inputs):
            wanted.setdefault(inp, []).append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = self.bar(len(requests), "loglikelihood requests", disable_tqdm)
        for batch in batches:
            logprobs = self.logprobs([list(t) for t in batch])
            for inp, lp in zip(batch, logprobs):
                for i in wanted.pop(inp, []):
                    cont = requests[i][2]
                    scored = lp[len(inp) - len(cont):len(inp)]
                    target = torch.tensor(cont, device=self.device)
                    greedy = bool((scored.argmax(-1) == target).all())
                    results[i] = (float(scored.gather(1, target[:, None]).sum()), greedy)
                    bar.update()
        bar.close()
        return results

    def bar(self, total: int, what: str, disable: bool = False) -> Any:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=f"scoring {what}", disable=disable or not self.progress, dynamic_ncols=True)

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
        bar = self.bar(len(requests), "generation requests", disable_tqdm)
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = kwargs.pop("max_gen_toks")
            ids = self.tok_encode(context)[-(self.max_length - new_tokens):]
            with self.autocast():
                new = generate(self.model, torch.tensor([ids], device=self.device), new_tokens,
                               temperature=float(kwargs.get("temperature") or 0.0), top_k=0, top_p=1.0,
                               eos_token_id=self.eot_token_id)[0]
            out.append(postprocess_generated_text(self.tokenizer.decode(new, skip_special_tokens=True), until,
                                                  None))
            bar.update()
        bar.close()
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
