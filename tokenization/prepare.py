"""CLI: documents -> token ids -> train_ids.npy, valid_ids.npy, meta.json, tokenizer/.

    python -m tokenization.prepare corpus.txt [more inputs] [--tokenizer gpt2] [--out data/]

Memory stays bounded: documents stream in, ids stream out to a flat file on disk, and the final
split copies ranges of that file into memory-mapped .npy files. Output appears atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from . import PrepareError, __version__
from .corpus import ReadOptions, iter_documents, resolve_sources, total_file_bytes

BATCH_CHARS = 2_000_000  # text per encode call: large enough to keep every core busy
COPY_TOKENS = 1 << 24  # tokens per copy when splitting, bounds memory in the final pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenization.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help=".txt/.jsonl/.json/.parquet files, directories, globs or HF dataset names")
    p.add_argument("--out", default="data", help="output directory (default: data)")
    p.add_argument("--tokenizer", default=None, help="AutoTokenizer name or folder; default: train a byte-level BPE")
    p.add_argument("--vocab_size", type=int, default=8192, help="vocabulary of the trained BPE (default 8192)")
    p.add_argument("--text_field", default="text", help="field holding the text in jsonl/json/parquet/HF records")
    p.add_argument("--doc_separator", default="none",
                   help="how a .txt splits into documents: none (whole file), blank (blank lines), "
                        "line (one per line) or a literal separator line such as '<|endoftext|>'")
    p.add_argument("--errors", choices=["strict", "replace"], default="strict", help="on non-UTF-8 input")
    p.add_argument("--val_fraction", type=float, default=0.05, help="share of documents (or tokens) for validation")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/valid split")
    p.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="threads for encoding (default: all cores)")
    p.add_argument("--dataset_config", default=None, help="config name of a Hugging Face dataset")
    p.add_argument("--split", default="train", help="split of a Hugging Face dataset (default: train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    if not 0.0 < args.val_fraction < 0.5:
        raise PrepareError(f"--val_fraction {args.val_fraction} must be between 0 and 0.5")
    if args.num_proc < 1:
        raise PrepareError("--num_proc must be at least 1")
    return args


def load_tokenizer(name_or_path: str):
    """AutoTokenizer for a hub name or folder, with a one-line error when it cannot be had."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only local folders and cached names work)" if offline else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrepareError(f"cannot load tokenizer {name_or_path!r}{hint}: {first}") from None


def separator_id(tok) -> int:
    """The id appended after every document: EOS, else SEP."""
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    raise PrepareError("the tokenizer has neither an EOS nor a SEP token to mark document ends; pick another tokenizer")


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class Encoder:
    """Batch encoding without special tokens, on every core: Rust threads for fast tokenizers,
    a process pool for the rare tokenizer that has no Rust backend."""

    def __init__(self, tok, tok_dir: Path, num_proc: int):
        self.tok = tok
        self.pool = None
        self.backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
        if self.backend is None and num_proc > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(str(tok_dir),))
            self.num_proc = num_proc

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        if self.pool is not None:
            step = max(1, math.ceil(len(texts) / (4 * self.num_proc)))
            parts = self.pool.map(_encode_slow, [texts[i:i + step] for i in range(0, len(texts), step)])
            return [ids for part in parts for ids in part]
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


_worker_tok = None


def _init_worker(tok_dir: str) -> None:
    global _worker_tok
    from transformers import AutoTokenizer

    _worker_tok = AutoTokenizer.from_pretrained(tok_dir)


def _encode_slow(texts: list[str]) -> list[list[int]]:
    return _worker_tok(texts, add_special_tokens=False)["input_ids"]


def batched(docs: Iterator[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class ValidPicker:
    """Deterministic document split: in each block of k consecutive documents, one seeded pick is valid.

    Exact proportions without knowing the document count in advance, so it works on a stream."""

    def __init__(self, val_fraction: float, seed: int):
        self.k = max(2, round(1 / val_fraction))
        self.seed = seed
        self._block = -1
        self._pick = 0

    def is_valid(self, index: int) -> bool:
        block = index // self.k
        if block != self._block:
            self._block = block
            self._pick = int(np.random.default_rng([self.seed, block]).integers(self.k))
        return index % self.k == self._pick


def encode_stream(docs: Iterator[str], encoder: Encoder, eos: int, dtype: np.dtype, out_file, picker: ValidPicker,
                  progress) -> dict:
    """Encode every document, append EOS, write ids to out_file; record the ranges of valid documents."""
    n_docs = n_tokens = total_bytes = 0
    valid_ranges: list[tuple[int, int, int]] = []  # (start, end, utf8 bytes) of each valid document
    with ThreadPoolExecutor(1) as reader:  # the next batch is read while this one is encoded
        batches = batched(docs, BATCH_CHARS)
        pending = reader.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = reader.submit(next, batches, None)
            encoded = encoder.encode(batch)
            lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
            flat = np.empty(int(lengths.sum()), dtype=dtype)
            ends = np.cumsum(lengths)
            flat[ends - 1] = eos
            pos = 0
            for ids, end in zip(encoded, ends):
                flat[pos:end - 1] = ids
                pos = end
            out_file.write(flat.tobytes())
            batch_bytes = 0
            starts = ends - lengths + n_tokens
            for i, doc in enumerate(batch):
                nbytes = len(doc.encode("utf-8"))
                batch_bytes += nbytes
                if picker.is_valid(n_docs + i):
                    valid_ranges.append((int(starts[i]), int(starts[i] + lengths[i]), nbytes))
            n_docs += len(batch)
            n_tokens += int(lengths.sum())
            total_bytes += batch_bytes
            progress.update(batch_bytes)
    return {"documents": n_docs, "tokens": n_tokens, "bytes": total_bytes, "valid_ranges": valid_ranges}


def split_ranges(stats: dict, picker: ValidPicker, val_fraction: float) -> tuple[list, list, str]:
    """Token ranges for train and valid: whole documents when there are enough, else the stream's tail."""
    n, total = stats["documents"], stats["tokens"]
    if n == 0 or total == 0:
        raise PrepareError("the corpus is empty: no document has any text")
    if n >= 2 * picker.k:
        valid = [(s, e) for s, e, _ in stats["valid_ranges"]]
        train, prev = [], 0
        for s, e in valid:
            if s > prev:
                train.append((prev, s))
            prev = e
        if prev < total:
            train.append((prev, total))
        return train, valid, "documents"
    n_valid = max(2, math.ceil(total * val_fraction))
    if total - n_valid < n_valid:
        raise PrepareError(
            f"the corpus is too small for a validation split: {total} tokens in {n} documents; add more text"
        )
    return [(0, total - n_valid)], [(total - n_valid, total)], "tail"


def write_split(flat: np.memmap, ranges: list[tuple[int, int]], path: Path) -> int:
    count = sum(e - s for s, e in ranges)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=flat.dtype, shape=(count,))
    pos = 0
    for s, e in ranges:
        for a in range(s, e, COPY_TOKENS):
            b = min(e, a + COPY_TOKENS)
            out[pos:pos + b - a] = flat[a:b]
            pos += b - a
    out.flush()
    del out
    return count


def tail_bytes(tok, flat: np.memmap, start: int, end: int) -> int:
    """UTF-8 bytes behind a token range, by decoding it in chunks (only for the tail split)."""
    total = 0
    for a in range(start, end, 1 << 20):
        total += len(tok.decode(flat[a:min(end, a + (1 << 20))].tolist()).encode("utf-8"))
    return total


def prepare(args: argparse.Namespace) -> Path:
    from tqdm.auto import tqdm

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    opts = ReadOptions(args.text_field, args.doc_separator, args.errors, args.dataset_config, args.split)
    sources = resolve_sources(args.inputs, opts)
    os.environ["RAYON_NUM_THREADS"] = str(args.num_proc)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    encoder = None
    try:
        tok_dir = tmp / "tokenizer"
        if args.tokenizer is None:
            from .bpe import train_bpe

            train_bpe(iter_documents(sources, opts), args.vocab_size, tok_dir)
            tok = load_tokenizer(str(tok_dir))
            tokenizer_name = f"byte-level BPE trained on the corpus (vocab {args.vocab_size})"
        else:
            tok = load_tokenizer(args.tokenizer)
            tok.save_pretrained(str(tok_dir))
            tokenizer_name = args.tokenizer
        eos = separator_id(tok)
        vocab_size = len(tok)
        dtype = id_dtype(vocab_size)
        encoder = Encoder(tok, tok_dir, args.num_proc)
        picker = ValidPicker(args.val_fraction, args.seed)

        t0 = time.perf_counter()
        bar = tqdm(total=total_file_bytes(sources), unit="B", unit_scale=True, desc="tokenize", disable=None)
        with open(tmp / "all.bin", "wb") as f:
            stats = encode_stream(iter_documents(sources, opts), encoder, eos, dtype, f, picker, bar)
        bar.close()
        train_r, valid_r, split = split_ranges(stats, picker, args.val_fraction)
        flat = np.memmap(tmp / "all.bin", dtype=dtype, mode="r")
        n_train = write_split(flat, train_r, tmp / "train_ids.npy")
        n_valid = write_split(flat, valid_r, tmp / "valid_ids.npy")
        if split == "documents":
            valid_bytes = sum(b for _, _, b in stats["valid_ranges"])
            valid_docs = len(valid_r)
        else:
            valid_bytes = tail_bytes(tok, flat, *valid_r[0])
            valid_docs = 0
        del flat
        (tmp / "all.bin").unlink()
        meta = {
            "version": 1,
            "package_version": __version__,
            "tokenizer": tokenizer_name,
            "vocab_size": vocab_size,
            "eos_token_id": eos,
            "dtype": dtype.name,
            "train_tokens": n_train,
            "valid_tokens": n_valid,
            "train_bytes": stats["bytes"] - valid_bytes,
            "valid_bytes": valid_bytes,
            "documents": stats["documents"],
            "train_documents": stats["documents"] - valid_docs,
            "valid_documents": valid_docs,
            "split": split,
            "val_fraction": args.val_fraction,
            "seed": args.seed,
            "sources": [s.info() for s in sources],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, out)
    finally:
        if encoder is not None:
            encoder.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old output is moved aside first and removed last."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        out = prepare(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    meta = json.loads((out / "meta.json").read_text())
    print(
        f"wrote {out}/: {meta['train_tokens']:,} train + {meta['valid_tokens']:,} valid tokens "
        f"({meta['dtype']}, vocab {meta['vocab_size']:,}, {meta['documents']:,} documents, split by {meta['split']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
