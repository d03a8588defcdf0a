"""Token data: memory-mapped ids from tokenization.prepare, random training windows, fixed eval windows.

Training windows are a pure function of (seed, step, rank): no sampler state to checkpoint, so a
resumed run draws exactly the windows the uninterrupted run would have drawn."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

REQUIRED = ("meta.json", "train_ids.npy", "valid_ids.npy")


class TokenData:
    """A prepared data directory, checked against its meta.json before any training starts."""

    def __init__(self, data_dir: str | Path):
        self.dir = Path(data_dir)
        if not self.dir.is_dir():
            raise UserError(f"data directory {self.dir} not found; create it with `python -m tokenization.prepare CORPUS --out {self.dir}`")
        missing = [name for name in REQUIRED if not (self.dir / name).is_file()]
        if missing:
            raise UserError(f"data directory {self.dir} is incomplete (missing {', '.join(missing)}); "
                            "run tokenization.prepare again")
        try:
            self.meta = json.loads((self.dir / "meta.json").read_text())
            self.vocab_size = int(self.meta["vocab_size"])
            self.dtype = np.dtype(self.meta["dtype"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{self.dir / 'meta.json'} is not a valid meta.json ({e}); run tokenization.prepare again") from None
        self.train = self._open("train")
        self.valid = self._open("valid")

    def _open(self, split: str) -> np.ndarray:
        path = self.dir / f"{split}_ids.npy"
        try:
            ids = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise UserError(f"{path} is not a readable .npy file ({e})") from None
        if ids.ndim != 1 or ids.dtype != self.dtype:
            raise UserError(f"{path} holds {ids.dtype} with shape {ids.shape}, but meta.json says 1-D {self.dtype}")
        expected = self.meta.get(f"{split}_tokens")
        if expected is not None and len(ids) != expected:
            raise UserError(f"{path} has {len(ids)} tokens, but meta.json says {expected}")
        return ids

    def check_ids_below(self, vocab_size: int) -> None:
        """Every id must index the model's embedding; scanned in chunks so memory stays flat."""
        for split, ids in (("train", self.train), ("valid", self.valid)):
            top = max((int(ids[i:i + (1 << 24)].max()) for i in range(0, len(ids), 1 << 24)), default=0)
            if top >= vocab_size:
                raise UserError(f"{split}_ids.npy holds token id {top}, but the model's vocabulary has "
                                f"{vocab_size} entries; the data and the model do not belong together")

    def check_block_size(self, block_size: int) -> None:
        for split, ids in (("train", self.train), ("valid", self.valid)):
            if len(ids) < block_size + 1:
                raise UserError(f"block_size {block_size} needs at least {block_size + 1} tokens, but the {split} "
                                f"split has {len(ids)}; lower --block_size or prepare more text")

    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on, so resume can refuse other data."""
        keys = ("vocab_size", "dtype", "train_tokens", "valid_tokens", "eos_token_id", "sources", "seed")
        blob = json.dumps({k: self.meta.get(k) for k in keys}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def bytes_per_token(self) -> float | None:
        if self.meta.get("valid_bytes") and self.meta.get("valid_tokens"):
            return self.meta["valid_bytes"] / self.meta["valid_tokens"]
        return None


def step_windows(ids: np.ndarray, n: int, block_size: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """n random windows of block_size + 1 tokens for one optimizer step of one rank, shape (n, T+1).

    Split into micro-batches by the caller: accumulation 4 x 2 and 1 x 8 see the same 8 windows."""
    rng = np.random.default_rng([seed, step, rank])
    return windows(ids, rng.integers(0, len(ids) - block_size, size=n), block_size)


def windows(ids: np.ndarray, starts: np.ndarray, block_size: int) -> torch.Tensor:
    """The windows ids[s : s + block_size + 1] as an int64 tensor (len(starts), block_size + 1)."""
    return torch.from_numpy(np.stack([ids[s:s + block_size + 1] for s in starts]).astype(np.int64))


def eval_starts(n_tokens: int, block_size: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows: i = 0, T, 2T, ... while i + T + 1 <= n_tokens."""
    starts = np.arange(0, max(n_tokens - block_size, 0), block_size)
    return starts if max_windows is None else starts[:max_windows]


def unigram_loss(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of `targets` under the add-one-smoothed unigram distribution of the
    training ids: the baseline a language model must clearly beat."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for i in range(0, len(train), 1 << 24):
        counts += np.bincount(train[i:i + (1 << 24)], minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(targets, dtype=np.int64)].mean())
