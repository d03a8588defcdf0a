"""Duplicate documents, found before encoding: exact (a hash of the normalised words) or near
(MinHash of word n-grams with LSH bands, FineWeb's settings by default: 5-grams, 112 permutations
in 14 bands of 8). The first copy in input order stays, the others are dropped.

One pass signs every document (rensa computes the MinHash); then, band by band, documents with an
equal band are candidates, a candidate whose estimated Jaccard similarity to its bucket's first
document reaches the threshold is joined to it, and each group keeps its earliest document. A
document's id is (source ordinal, index in the source), so the signatures of shards, concatenated
and sorted, are those of the whole corpus: a sharded preparation drops what an unsharded one drops.
Memory grows with the number of documents, not their bytes: about 100 bytes per document (exact),
plus 448 for the MinHash row (minhash); BENCHMARKS.md has the peak on 1 GB."""
from __future__ import annotations

import array
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from . import PrepareError
from .corpus import DocPart
from .words import DocWords, ngram_hashes, size_of

METHODS = ("none", "exact", "minhash")
SIGNATURES = "signatures.npz"


@dataclass(frozen=True)
class DedupSettings:
    method: str = "exact"
    threshold: float = 0.75  # estimated Jaccard similarity of word n-grams (minhash)
    ngram: int = 5
    num_perm: int = 112
    seed: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise PrepareError(f"--dedup {self.method!r}: choose one of {', '.join(METHODS)}")
        if not 0.0 < self.threshold <= 1.0:
            raise PrepareError(f"--dedup_threshold {self.threshold} must be in (0, 1]")
        if self.ngram < 1:
            raise PrepareError(f"--dedup_ngram {self.ngram} must be at least 1")

    @property
    def rows(self) -> int:
        """Rows per LSH band: of the ways to cut num_perm into bands, the one whose S-curve midpoint
        (1/bands)^(1/rows) lies nearest the threshold (0.75 -> 14 bands of 8, FineWeb's)."""
        divisors = [r for r in range(1, self.num_perm + 1) if self.num_perm % r == 0]
        return min(divisors, key=lambda r: abs((r / self.num_perm) ** (1 / r) - self.threshold))

    def info(self) -> dict:
        if self.method == "exact":
            return {"normalised": "lower case, punctuation as space, whitespace collapsed"}
        return {**{k: v for k, v in asdict(self).items() if k != "method"},
                "bands": self.num_perm // self.rows, "rows": self.rows}


@dataclass
class Signatures:
    """Per document: id (source ordinal, index), UTF-8 bytes, word count, and its key: two uint64
    (exact) or num_perm uint32 (minhash)."""

    ids: np.ndarray
    sizes: np.ndarray
    words: np.ndarray
    keys: np.ndarray

    def save(self, path: Path) -> None:
        np.savez(path, ids=self.ids, sizes=self.sizes, words=self.words, keys=self.keys)

    @staticmethod
    def load(path: Path) -> "Signatures":
        with np.load(path) as z:
            return Signatures(z["ids"], z["sizes"], z["words"], z["keys"])

    @staticmethod
    def join(parts: list["Signatures"]) -> "Signatures":
        """Shards' signatures as one corpus, in input order."""
        ids = np.concatenate([p.ids for p in parts])
        order = np.lexsort((ids[:, 1], ids[:, 0]))
        return Signatures(ids[order], *(np.concatenate([getattr(p, k) for p in parts])[order]
                                        for k in ("sizes", "words", "keys")))


BLOCK = 16384  # documents per block of signatures


class Signer:
    """Signs documents as their parts stream by (a document of any size: MinHash is the minimum over
    its n-grams, so parts combine by an element-wise minimum)."""

    def __init__(self, settings: DedupSettings):
        self.s = settings
        self.columns = {k: array.array("q") for k in ("source", "index", "sizes", "words")}  # 8 bytes a value
        width, dtype = (2, np.uint64) if settings.method == "exact" else (settings.num_perm, np.uint32)
        self._blank = np.zeros((BLOCK, width), dtype)
        self._blocks: list[np.ndarray] = []  # keys in blocks of BLOCK rows: no Python object per document,
        self._start()                        # and no copy of them all while they grow

    def _start(self) -> None:
        self._words = DocWords(self.s.ngram - 1 if self.s.method == "minhash" else 0)
        self._count = self._size = 0
        self._blake = hashlib.blake2b(digest_size=16)
        self._min = np.full(self.s.num_perm, np.iinfo(np.uint32).max, np.uint32)
        self._head = np.zeros(0, np.uint64)  # a document shorter than n words is one n-gram of all it has

    def add(self, part: DocPart) -> None:
        words, hashes = self._words.feed(part.text, part.last)
        self._count += len(words)
        self._size += size_of(part.text)
        if self.s.method == "exact":
            self._blake.update(b" ".join(words) + b" ")
        else:
            if self._count < self.s.ngram:
                self._head = hashes  # a short document's words so far (the carry holds them all)
            self._fold(ngram_hashes(hashes, self.s.ngram))
        if part.last:
            self._finish(part.doc)

    def _fold(self, grams: np.ndarray) -> None:
        from rensa import RMinHash

        if len(grams):
            rows = RMinHash.digest_matrix_from_flat_token_hashes(
                grams, np.array([0, len(grams)], np.uint64), self.s.num_perm, self.s.seed).to_rows()
            np.minimum(self._min, np.asarray(rows[0], np.uint32), out=self._min)

    def _finish(self, doc: tuple[int, int]) -> None:
        if self.s.method == "exact":
            key = np.frombuffer(self._blake.digest(), np.uint64).copy()
        else:
            if 0 < self._count < self.s.ngram:
                self._fold(ngram_hashes(self._head, self._count))
            key = self._min
        c = self.columns
        n = len(c["index"])
        if n == len(self._blocks) * BLOCK:
            self._blocks.append(self._blank.copy())
        self._blocks[-1][n % BLOCK] = key
        for name, value in zip(c, (*doc, self._size, self._count)):
            c[name].append(value)
        self._start()

    def signatures(self) -> Signatures:
        """Everything signed, once: the blocks are handed over as they are copied."""
        c = {k: np.frombuffer(v, np.int64) if len(v) else np.zeros(0, np.int64) for k, v in self.columns.items()}
        n = len(c["index"])
        keys = np.empty((n, self._blank.shape[1]), self._blank.dtype)
        for start in range(0, n, BLOCK):  # each block freed as it is copied: the keys are held once, plus a block
            keys[start:start + BLOCK] = self._blocks.pop(0)[:n - start]
        return Signatures(np.stack([c["source"], c["index"]], 1), c["sizes"], c["words"], keys)


def sign(parts: Iterable[DocPart], settings: DedupSettings) -> Signatures:
    signer = Signer(settings)
    for part in parts:
        signer.add(part)
    return signer.signatures()


def _first_of_groups(keys: np.ndarray) -> np.ndarray:
    """For each row, the index of the first row with an equal key."""
    _, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    first = np.full(inverse.max() + 1 if len(inverse) else 0, len(keys), np.int64)
    np.minimum.at(first, inverse, np.arange(len(keys)))
    return first[inverse]


def _components(label: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Joins the groups of documents a[i] and b[i] in the grouping `label` (each document's label is
    its group's smallest index): minimum-label propagation over the groups' roots with pointer
    jumping, vectorised; then every document follows its old root."""
    root = label.copy()
    ra, rb = label[a], label[b]
    while len(a):
        low = np.minimum(root[ra], root[rb])
        joined = root.copy()
        np.minimum.at(joined, ra, low)
        np.minimum.at(joined, rb, low)
        while not np.array_equal(joined[joined], joined):
            joined = joined[joined]
        if np.array_equal(joined, root):
            break
        root = joined
    return root[label]


def similarity(keys: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The estimated Jaccard similarity of documents a[i] and b[i]: the share of equal signature
    entries, in chunks of 4,096 pairs (a row pair at a time would be slow, all at once large)."""
    if not len(a):
        return np.zeros(0)
    chunks = max(1, len(a) // 4096)
    return np.concatenate([(keys[x] == keys[y]).mean(1) for x, y in zip(np.array_split(a, chunks),
                                                                       np.array_split(b, chunks))])


def kept_copies(sig: Signatures, settings: DedupSettings) -> np.ndarray:
    """For every document (in input order), the index of the copy kept: itself, or the earliest
    document of its group of duplicates. Documents with no words are never duplicates."""
    n = len(sig.ids)
    has_words = sig.words > 0
    bands = [sig.keys] if settings.method == "exact" else \
        [sig.keys[:, i:i + settings.rows] for i in range(0, settings.num_perm, settings.rows)]
    label = np.arange(n)
    for band in bands:
        if not n:
            break
        first = _first_of_groups(band)
        pairs = np.flatnonzero((first != np.arange(n)) & has_words & has_words[first])
        if settings.method == "minhash" and len(pairs):
            pairs = pairs[similarity(sig.keys, pairs, first[pairs]) >= settings.threshold]
        label = _components(label, pairs, first[pairs])
    return label


@dataclass
class Plan:
    """Which documents go: kept[i] is the index of the copy document i keeps (itself when it stays)."""

    sig: Signatures
    kept: np.ndarray
    stats: dict

    @property
    def dropped(self) -> np.ndarray:
        return np.flatnonzero(self.kept != np.arange(len(self.kept)))


def plan(sig: Signatures, settings: DedupSettings) -> Plan:
    kept = kept_copies(sig, settings)
    found = Plan(sig, kept, {})
    dropped = found.dropped
    found.stats = {"method": settings.method, "settings": settings.info(), "documents_in": len(kept),
                   "documents_dropped": len(dropped), "bytes_dropped": int(sig.sizes[dropped].sum())}
    return found


def shard_signatures(folder: Path, settings: DedupSettings, count: int,
                     inputs: dict) -> tuple[Signatures, dict[str, str]]:
    """The signatures of every shard of a `--signatures_only` run, checked to be complete, alike, and
    made from the inputs named now, in the same order and read the same way (screen.inputs_of); with
    the sha256 of each input as step one read it, for the check after encoding."""
    found, sha256 = {}, {}
    for meta_path in sorted(folder.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        info = meta.get("signatures")
        if not info:
            continue
        if info["method"] != settings.method or info["settings"] != settings.info():
            raise PrepareError(f"{meta_path.parent} holds {info['method']} signatures with other settings than "
                               "this run's; sign every shard with the same --dedup options")
        if info["shard_count"] != count:
            raise PrepareError(f"{meta_path.parent} was signed as one of {info['shard_count']} shards, not {count}")
        if info.get("inputs") != inputs["inputs"]:
            raise PrepareError(f"the signatures in {meta_path.parent} were made from other inputs than this run's "
                               "(or in another order, or of another size); sign the same inputs, in the same order, "
                               "that the shards prepare")
        if info.get("read") != inputs["read"]:
            changed = sorted(k for k in inputs["read"] if (info.get("read") or {}).get(k) != inputs["read"][k])
            raise PrepareError(f"the signatures in {meta_path.parent} were read with other options ({', '.join(changed)}"
                               "); sign and prepare with the same --doc_separator, --text_field and --errors")
        found[info["shard_index"]] = meta_path.parent / SIGNATURES
        sha256.update({src["name"]: src["sha256"] for src in meta.get("sources", []) if src.get("sha256")})
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise PrepareError(f"--dedup_signatures {folder} lacks the signatures of shard(s) {missing}: run "
                           "prepare --signatures_only for every shard into that folder first")
    return Signatures.join([Signatures.load(found[i]) for i in range(count)]), sha256
