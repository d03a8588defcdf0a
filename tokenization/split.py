"""Train/valid split and publishing: which documents are valid, the .npy files copied from the flat
id file in bounded memory, and the finished folder renamed into place."""
from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import PrepareError

COPY_TOKENS = 1 << 24  # tokens per copy when splitting, bounds memory in the final pass


class ValidPicker:
    """Deterministic document split: in each block of k consecutive documents of a source, one
    seeded pick is valid.

    Keyed by (source ordinal, index in the source), so a sharded preparation picks exactly the
    documents an unsharded one picks, and it works on a stream of unknown length."""

    def __init__(self, val_fraction: float, seed: int):
        self.k = max(2, round(1 / val_fraction))
        self.seed = seed
        self._block: tuple[int, int] = (-1, -1)
        self._pick = 0

    def is_valid(self, doc: tuple[int, int]) -> bool:
        source, index = doc
        block = (source, index // self.k)
        if block != self._block:
            self._block = block
            self._pick = int(np.random.default_rng([self.seed, source, block[1]]).integers(self.k))
        return index % self.k == self._pick


def split_ranges(stats: dict, picker: ValidPicker, val_fraction: float) -> tuple[list, list, str]:
    """Token ranges for train and valid: whole documents when there are enough, else the stream's tail."""
    n, total = stats["documents"], stats["tokens"]
    if n == 0 or total == 0:
        raise PrepareError("the corpus is empty: no document has any text")
    if n >= 2 * picker.k and stats["valid_ranges"] and len(stats["valid_ranges"]) < n:
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


def write_split(src: Path, dtype: np.dtype, ranges: list[tuple[int, int]], path: Path) -> tuple[int, int | None]:
    """Copy token ranges of the flat id file into a .npy with plain reads and writes: memory-mapping
    both files would count every page touched towards the process's resident memory. Returns the
    token count and the largest id (None for no tokens), taken from the chunks as they are copied so
    that meta.json's max_token_id spares training a pass over the ids."""
    count = sum(e - s for s, e in ranges)
    size = dtype.itemsize
    tops: list[int] = []
    with open(src, "rb") as f, open(path, "wb") as out:
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)})
        for s, e in ranges:
            f.seek(s * size)
            for a in range(s, e, COPY_TOKENS):
                chunk = f.read((min(e, a + COPY_TOKENS) - a) * size)
                out.write(chunk)
                tops.append(int(np.frombuffer(chunk, dtype=dtype).max()))
    return count, max(tops, default=None)


def tail_bytes(tok, src: Path, dtype: np.dtype, start: int, end: int) -> int:
    """UTF-8 bytes behind a token range, by decoding it in chunks (only for the tail split)."""
    total = 0
    for a in range(start, end, 1 << 20):
        ids = np.fromfile(src, dtype=dtype, count=min(end, a + (1 << 20)) - a, offset=a * dtype.itemsize)
        total += len(tok.decode(ids.tolist()).encode("utf-8"))
    return total


def split_ids(tok: Any, tmp: Path, dtype: np.dtype, stats: dict, picker: ValidPicker, val_fraction: float) -> dict:
    """tmp/all.bin -> tmp/train_ids.npy and tmp/valid_ids.npy (all.bin is removed); returns meta.json's
    counts of the split."""
    train_r, valid_r, split = split_ranges(stats, picker, val_fraction)
    n_train, train_max = write_split(tmp / "all.bin", dtype, train_r, tmp / "train_ids.npy")
    n_valid, valid_max = write_split(tmp / "all.bin", dtype, valid_r, tmp / "valid_ids.npy")
    if split == "documents":
        valid_bytes, valid_docs = sum(b for _, _, b in stats["valid_ranges"]), len(valid_r)
    else:
        valid_bytes, valid_docs = tail_bytes(tok, tmp / "all.bin", dtype, *valid_r[0]), 0
    (tmp / "all.bin").unlink()
    return {"train_tokens": n_train, "valid_tokens": n_valid, "max_token_id": {"train": train_max, "valid": valid_max},
            "valid_bytes": valid_bytes, "valid_documents": valid_docs, "split": split}


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Nothing a user had is replaced without --overwrite (an empty folder is not "had")."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` to write into; published as `out` when the block ends without an
    error, removed in every case, so a failed or interrupted preparation leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an old output is moved aside first and removed last."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
