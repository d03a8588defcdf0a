"""Token data: memory-mapped ids from tokenization.prepare, random training windows, fixed eval windows.

A data source is a prepared directory or a merged one (tokenization.merge: its meta.json lists
shard directories, read in place). `--data a:0.7,b:0.3` mixes sources: each window comes from a
source drawn with those weights. Windows never cross two shards.

Training windows are a pure function of (seed, step, rank): no sampler state to checkpoint, so a
resumed run draws exactly the windows the uninterrupted run would have drawn."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch

from .errors import UserError

REQUIRED = ("meta.json", "train_ids.npy", "valid_ids.npy")
CHUNK = 1 << 24  # tokens per read when scanning a split


def parse_data_spec(spec: str) -> list[tuple[str, float]]:
    """'dir' -> [(dir, 1.0)]; 'a:0.7,b:0.3' -> [(a, 0.7), (b, 0.3)], weights normalised to sum 1
    ('a:7,b:3' and 'a:0.7,b:0.4' are ratios too)."""
    sources = given_weights(spec)
    total = sum(w for _, w in sources)
    return [(p, w / total) for p, w in sources]


def given_weights(spec: str) -> list[tuple[str, float]]:
    """The sources of a --data spec with their weights as written."""
    sources = []
    for item in str(spec).split(","):
        path, sep, weight = item.strip().rpartition(":")
        try:
            w = float(weight) if sep else 1.0
        except ValueError:
            path, w = item.strip(), 1.0
        path = path if sep and path else item.strip()
        if not path or not (w > 0 and np.isfinite(w)):
            raise UserError(f"--data {spec!r}: each source is DIR or DIR:WEIGHT with a positive weight")
        sources.append((path, w))
    return sources


def _read_meta(d: Path) -> dict[str, Any]:
    if d.is_file():
        raise UserError(f"--data {d} is a file; data must be prepared first: "
                        f"`python -m tokenization.prepare {d} --out data`, then --data data")
    if not d.is_dir():
        raise UserError(f"data directory {d} not found; create it with `python -m tokenization.prepare CORPUS --out {d}`")
    if not (d / "meta.json").is_file():
        raise UserError(f"data directory {d} is incomplete (missing meta.json); run tokenization.prepare again")
    try:
        meta = json.loads((d / "meta.json").read_text())
        int(meta["vocab_size"]), np.dtype(meta["dtype"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{d / 'meta.json'} is not a valid meta.json ({e}); run tokenization.prepare again") from None
    return meta


def _open_split(d: Path, meta: dict[str, Any], split: str) -> np.ndarray:
    path = d / f"{split}_ids.npy"
    try:
        ids = np.load(path, mmap_mode="r")
    except ValueError as e:
        raise UserError(f"{path} is not a readable .npy file ({e})") from None
    dtype = np.dtype(meta["dtype"])
    if ids.ndim != 1 or ids.dtype != dtype:
        raise UserError(f"{path} holds {ids.dtype} with shape {ids.shape}, but meta.json says 1-D {dtype}")
    expected = meta.get(f"{split}_tokens")
    if expected is not None and len(ids) != expected:
        raise UserError(f"{path} has {len(ids)} tokens, but meta.json says {expected}")
    return ids


def _chunks(a: np.ndarray) -> Iterator[np.ndarray]:
    for i in range(0, len(a), CHUNK):
        yield a[i:i + CHUNK]


def _scan_max(a: np.ndarray) -> int | None:
    """An array's largest id, read in chunks so memory stays flat; None when it is empty."""
    return max((int(c.max()) for c in _chunks(a)), default=None)


class Ids:
    """One split (train or valid) of every source: groups (one per source) of memory-mapped arrays
    (one per shard), addressed as if concatenated. A window lies inside one array. `recorded` holds
    each array's largest id from its meta.json (max_token_id), None where that predates the field."""

    def __init__(self, groups: list[list[np.ndarray]], weights: list[float],
                 recorded: list[int | None] | None = None):
        self.groups, self.weights = groups, weights
        self.parts = [a for g in groups for a in g]
        self.recorded = recorded or [None] * len(self.parts)
        self.offsets = np.cumsum([0] + [len(a) for a in self.parts])
        self.first = np.cumsum([0] + [len(g) for g in groups])  # index in parts of each group's first array

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def shortest(self) -> int:
        return min(len(a) for a in self.parts)

    def chunks(self) -> Iterator[np.ndarray]:
        for a in self.parts:
            yield from _chunks(a)

    def max_id(self) -> int | None:
        """The largest id (None when there is none): the recorded one of each array that has it, so a
        start or requeue reads no ids; only arrays of data that predates the record are scanned."""
        tops = [_scan_max(a) if top is None else top for a, top in zip(self.parts, self.recorded)]
        return max((t for t in tops if t is not None), default=None)

    def _starts_in_group(self, g: int, rng: np.random.Generator, n: int, block_size: int) -> np.ndarray:
        """n global window starts, uniform over every window that fits inside one of group g's arrays."""
        room = np.array([len(a) - block_size for a in self.groups[g]], dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(room)])
        r = rng.integers(0, cum[-1], size=n)
        part = np.searchsorted(cum, r, side="right") - 1
        return self.offsets[self.first[g] + part] + (r - cum[part])

    def random_starts(self, rng: np.random.Generator, n: int, block_size: int) -> np.ndarray:
        """n window starts, uniform over every possible window of the chosen source; with several
        sources each window's source is drawn by weight first (one source draws no choice, so a
        single data directory gets exactly the windows it always got)."""
        which = rng.choice(len(self.groups), size=n, p=self.weights) if len(self.groups) > 1 else np.zeros(n, int)
        starts = np.empty(n, dtype=np.int64)
        for g in range(len(self.groups)):
            mask = which == g
            starts[mask] = self._starts_in_group(g, rng, int(mask.sum()), block_size)
        return starts

    def eval_starts(self, block_size: int, max_windows: int | None = None) -> np.ndarray:
        """Consecutive non-overlapping windows of each array (0, T, 2T, ... while a window fits); with
        several sources, max_windows is shared out by weight."""
        per_group = []
        for g, arrays in enumerate(self.groups):
            starts = np.concatenate([self.offsets[self.first[g] + i] + np.arange(0, max(len(a) - block_size, 0), block_size)
                                     for i, a in enumerate(arrays)]).astype(np.int64)
            if max_windows is not None:
                share = max_windows if len(self.groups) == 1 else max(1, round(max_windows * self.weights[g]))
                starts = starts[:share]
            per_group.append(starts)
        return np.concatenate(per_group)

    def windows(self, starts: np.ndarray, block_size: int) -> torch.Tensor:
        """The windows [s, s + block_size + 1) as an int64 tensor (len(starts), block_size + 1)."""
        part = np.searchsorted(self.offsets, starts, side="right") - 1
        rows = [self.parts[p][s - self.offsets[p]:s - self.offsets[p] + block_size + 1] for p, s in zip(part, starts)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records of prepared data (meta.json, a checkpoint's train state) come from one
    tokenizer: by tokenizer_fingerprint where both have one, else by tokenizer_sha256 where both have
    one (data made before the fingerprint); the vocabulary size always."""
    key = "tokenizer_fingerprint" if a.get("tokenizer_fingerprint") and b.get("tokenizer_fingerprint") \
        else "tokenizer_sha256"
    sha, other = a.get(key), b.get(key)
    return not (sha and other and sha != other) and a.get("vocab_size") == b.get("vocab_size")


def _check_same_tokenizer(where: Path, meta: dict[str, Any], first_dir: Path, first: dict[str, Any]) -> None:
    """Every source and shard of a run must come from one tokenizer (same_tokenizer), with one EOS."""
    if not same_tokenizer(meta, first) or meta.get("eos_token_id") != first.get("eos_token_id"):
        raise UserError(f"{where} was prepared with another tokenizer than {first_dir} ({meta.get('tokenizer')} vs "
                        f"{first.get('tokenizer')}); every source and shard of a run needs the same tokenizer")


class TokenData:
    """The prepared data of a run, checked against every meta.json before any training starts."""

    def __init__(self, spec: str | Path):
        self.spec = str(spec)
        self.sources = parse_data_spec(self.spec)
        self.given_weights = [w for _, w in given_weights(self.spec)]
        self.dir = Path(self.sources[0][0])
        self.metas: list[dict[str, Any]] = []  # one per source
        train_groups, valid_groups, first = [], [], None
        recorded: list[dict[str, Any]] = []  # max_token_id of each shard, in the order of Ids.parts
        for path, _ in self.sources:
            d = Path(path)
            meta = _read_meta(d)
            shards = [(d / s).resolve() for s in meta["shards"]] if "shards" in meta else [d]
            train, valid = [], []
            for shard in shards:
                smeta = meta if shard == d else _read_meta(shard)
                missing = [name for name in REQUIRED if not (shard / name).is_file()]
                if missing:
                    raise UserError(f"data directory {shard} is incomplete (missing {', '.join(missing)}); "
                                    "run tokenization.prepare again")
                first = first or (shard, smeta)
                _check_same_tokenizer(shard, smeta, *first)
                train.append(_open_split(shard, smeta, "train"))
                valid.append(_open_split(shard, smeta, "valid"))
                recorded.append(smeta.get("max_token_id") or {})
            self.metas.append(meta)
            train_groups.append(train)
            valid_groups.append(valid)
        self.meta = self.metas[0]
        self.vocab_size = int(self.meta["vocab_size"])
        weights = [w for _, w in self.sources]
        self.train = Ids(train_groups, weights, [r.get("train") for r in recorded])
        self.valid = Ids(valid_groups, weights, [r.get("valid") for r in recorded])

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.meta.get("tokenizer_sha256")

    @property
    def tokenizer_fingerprint(self) -> str | None:
        return self.meta.get("tokenizer_fingerprint")

    def check_ids_below(self, vocab_size: int) -> None:
        """Every id must index the model's embedding: prepare's recorded largest ids, read only in data
        that predates them (Ids.max_id)."""
        for split, ids in (("train", self.train), ("valid", self.valid)):
            top = ids.max_id()
            if top is not None and top >= vocab_size:
                raise UserError(f"{split}_ids.npy holds token id {top}, but the model's vocabulary has "
                                f"{vocab_size} entries; the data and the model do not belong together")

    def check_block_size(self, block_size: int) -> None:
        for split, ids in (("train", self.train), ("valid", self.valid)):
            if ids.shortest() < block_size + 1:
                where = "split" if len(ids.parts) == 1 else "split of one of its shards or sources"
                raise UserError(f"block_size {block_size} needs at least {block_size + 1} tokens, but the {split} "
                                f"{where} has {ids.shortest()}; lower --block_size or prepare more text")

    def fingerprint(self) -> str:
        """Identifies the data a checkpoint was trained on, so resume can refuse other data."""
        keys = ("vocab_size", "dtype", "train_tokens", "valid_tokens", "eos_token_id", "sources", "seed")
        metas = [{k: m.get(k) for k in keys} | ({"shards": m["shards"]} if "shards" in m else {}) for m in self.metas]
        blob = json.dumps(metas[0] if len(metas) == 1 else [metas, [w for _, w in self.sources]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes per validation token, weighted by source: converts nats per token to bits per byte."""
        total = 0.0
        for meta, (_, w) in zip(self.metas, self.sources):
            if not (meta.get("valid_bytes") and meta.get("valid_tokens")):
                return None
            total += w * meta["valid_bytes"] / meta["valid_tokens"]
        return total


class TokenizerPrints(NamedTuple):
    """A model's tokenizer as meta.json's keys would record it (None: cannot be had)."""
    fingerprint: str | None  # tokenizer_fingerprint of what AutoTokenizer loads
    loaded_sha256: str | None  # tokenizer_sha256 of that loaded pipeline: what older prepare recorded for it
    raw_sha256: str | None  # tokenizer_sha256 of the raw tokenizer.json: what older versions compared with


def _has_vocabulary(tok) -> bool:
    """More entries than its added tokens: a tokenizer loaded from files, not made up from a config alone."""
    try:
        return len(tok.get_vocab()) > len(getattr(tok, "added_tokens_decoder", None) or {})
    except Exception:  # a tokenizer that cannot list its vocabulary: trust that it was loaded from files
        return True


def tokenizer_prints(source: str | Path | None) -> TokenizerPrints:
    """What a data directory's meta.json is compared with, for a tokenizer folder or hub name. Loads it
    with tokenization.tokenizer's own loader and fingerprint, so prepare and this check agree."""
    if source is None:
        return TokenizerPrints(None, None, None)
    from tokenization import PrepareError
    from tokenization.tokenizer import legacy_sha256, load_tokenizer, tokenizer_fingerprint

    try:
        tok = load_tokenizer(str(source))
    except PrepareError:  # offline, no such repo, no tokenizer: only a raw tokenizer.json may still compare
        tok = None
    if tok is not None and not _has_vocabulary(tok):
        tok = None  # transformers 5 builds an empty tokenizer for a model folder without tokenizer files
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    path: Path | None = Path(source) / "tokenizer.json"
    if not path.is_file():
        path = None
        if not Path(source).exists():
            try:
                from huggingface_hub import hf_hub_download

                path = Path(hf_hub_download(str(source), "tokenizer.json"))
            except Exception:  # offline, no such repo, no tokenizer.json
                path = None
    raw = None
    if path is not None:
        from tokenizers import Tokenizer

        try:
            raw = legacy_sha256(Tokenizer.from_file(str(path)).to_str())
        except Exception:  # a tokenizer.json this `tokenizers` cannot read: nothing to compare
            raw = None
    return TokenizerPrints(tokenizer_fingerprint(tok) if tok is not None else None,
                           legacy_sha256(backend.to_str()) if backend is not None else None, raw)


def check_same_tokenizer(data: TokenData, tokenizer: str | Path | None, what: str) -> None:
    """Refuse data made by another tokenizer than the model's: its ids would mean other strings.

    Data with a tokenizer_fingerprint is compared with the fingerprint of what AutoTokenizer loads from
    the model's tokenizer (both sides: tokenization.tokenizer.tokenizer_fingerprint). Data made before it
    (tokenizer_sha256 alone), or a tokenizer that does not load, keeps the older rule, widened: it passes
    when its tokenizer_sha256 is the raw tokenizer.json's (or there is none to compare) or the loaded
    tokenizer's, so nothing let through before is refused now."""
    if tokenizer is None or not (data.tokenizer_fingerprint or data.tokenizer_sha256):
        return
    ours = tokenizer_prints(tokenizer)
    if data.tokenizer_fingerprint and ours.fingerprint:
        same = ours.fingerprint == data.tokenizer_fingerprint
    else:
        sha = data.tokenizer_sha256
        same = not sha or ours.raw_sha256 is None or sha in (ours.raw_sha256, ours.loaded_sha256)
    if not same:
        raise UserError(f"{data.spec} was prepared with another tokenizer ({data.meta.get('tokenizer')}) than {what} "
                        f"({tokenizer}); prepare the data with `--tokenizer {tokenizer}`")


def step_windows(ids: Ids, n: int, block_size: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """n random windows of block_size + 1 tokens for one optimizer step of one rank, shape (n, T+1).

    Split into micro-batches by the caller: accumulation 4 x 2 and 1 x 8 see the same 8 windows."""
    rng = np.random.default_rng([seed, step, rank])
    return ids.windows(ids.random_starts(rng, n, block_size), block_size)


def unigram_loss(train: Ids, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of `targets` under the add-one-smoothed unigram distribution of the
    training ids: the baseline a language model must clearly beat."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for chunk in train.chunks():
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(targets, dtype=np.int64)].mean())
