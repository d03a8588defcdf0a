"""Normalised words and their n-gram hashes: the unit in which duplicates and benchmark overlap are
counted, the same for the corpus and for the benchmarks (lower case, punctuation as a space, split
on whitespace, as GPT-3's and lm-eval's decontamination normalise; NFKC first).

Words are hashed to 64 bits by rensa (Rust); an n-gram's hash combines its words' hashes in numpy,
so a document of a million words costs a few vectorised passes, not a million Python strings."""
from __future__ import annotations

import unicodedata

import numpy as np

_SPACE = tuple(c for c in map(chr, range(0x10000)) if unicodedata.category(c)[0] in "PZ")  # punctuation, spaces
_FORMAT = tuple(c for c in map(chr, range(0x10000)) if unicodedata.category(c) == "Cf")  # soft hyphen, zero-width
_TABLE = str.maketrans({**{c: " " for c in _SPACE}, **{c: None for c in _FORMAT}})
_ASCII_PUNCTUATION = "".join(c for c in _SPACE if c < "\x80").encode()
_ASCII_TABLE = bytes.maketrans(_ASCII_PUNCTUATION, b" " * len(_ASCII_PUNCTUATION))
_WHITESPACE = " \n\t\r\f\v"
_MIX = (np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53))  # murmur3's 64-bit finaliser
_ODD = np.uint64(0x9E3779B97F4A7C15)


def normalized_words(text: str) -> list[bytes]:
    """UTF-8 words; ASCII text takes a bytes path six times faster than str.translate, with the same result.
    Other text is NFKC-normalised first (composed and decomposed accents, full-width letters and
    ligatures are the same words) and loses its invisible format characters (soft hyphens, zero-width
    spaces and joiners), so that text pasted from another source still matches."""
    if text.isascii():
        return text.encode().lower().translate(_ASCII_TABLE).split()
    return unicodedata.normalize("NFKC", text).lower().translate(_TABLE).encode().split()


def word_hashes(words: list[bytes]) -> np.ndarray:
    """64-bit hashes of the words, stable across processes and machines (shards compare them)."""
    from rensa import RMinHash

    if not words:
        return np.zeros(0, np.uint64)
    return np.asarray(RMinHash.hash_token_sets([words])[0], dtype=np.uint64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One 64-bit hash per run of n consecutive words (order matters); empty when fewer than n."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.zeros(0, np.uint64)
    with np.errstate(over="ignore"):
        out = np.zeros(count, np.uint64)
        for j in range(n):
            out = out * _ODD + hashes[j:j + count]
        out ^= out >> np.uint64(33)
        out *= _MIX[0]
        out ^= out >> np.uint64(33)
        out *= _MIX[1]
        out ^= out >> np.uint64(33)
    return out


class DocWords:
    """The normalised words of a document that arrives in parts: a word cut between two parts is
    joined. With keep > 0 each call also returns its words' hashes preceded by the last `keep` of
    the part before, so that n-grams across a cut are counted (keep = n - 1)."""

    def __init__(self, keep: int = 0):
        self.keep = keep
        self._tail = ""
        self._carry = np.zeros(0, np.uint64)

    def feed(self, text: str, last: bool) -> tuple[list[bytes], np.ndarray | None]:
        """(this part's words, their hashes with the carried ones in front, or None when keep is 0)."""
        text = self._tail + text
        self._tail = ""
        if not last and text and text[-1] not in _WHITESPACE:
            cut = max(text.rfind(c) for c in _WHITESPACE)
            if cut >= 0 and len(text) - cut < 1 << 16:  # a run of 64k characters without a space is cut anyway
                text, self._tail = text[:cut + 1], text[cut + 1:]
        words = normalized_words(text)
        if not self.keep:
            return words, None
        hashes = np.concatenate([self._carry, word_hashes(words)])
        self._carry = np.zeros(0, np.uint64) if last else hashes[len(hashes) - min(self.keep, len(hashes)):]
        return words, hashes


def size_of(text: str) -> int:
    """UTF-8 bytes of text (what meta.json counts)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))
