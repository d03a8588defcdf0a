"""Encoding: long documents cut into pieces at points where the ids do not change, pieces encoded
in batches on every core, ids streamed to a flat file with an EOS after every document."""
from __future__ import annotations

import math
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from .corpus import DocPart
from .fit import FitCounter
from .split import ValidPicker
from .tokenizer import keep_every_token

BATCH_CHARS = 2_000_000  # text per encode call: large enough to keep every core busy
PIECE_CHARS = 1 << 16  # a longer document is encoded in pieces of about this size, cut at safe points
MAX_PIECE_CHARS = 1 << 22  # with no safe point in this much text, a piece is cut anyway (counted in meta.json)


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
        return _encode_with(self.tok, texts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


_worker_tok = None


def _init_worker(tok_dir: str) -> None:
    global _worker_tok
    from transformers import AutoTokenizer

    _worker_tok = AutoTokenizer.from_pretrained(tok_dir)
    keep_every_token(_worker_tok)


def _encode_slow(texts: list[str]) -> list[list[int]]:
    return _encode_with(_worker_tok, texts)


def _encode_with(tok, texts: list[str]) -> list[list[int]]:
    """A tokenizer without a Rust backend, told explicitly to keep every token."""
    return tok(texts, add_special_tokens=False, truncation=False, padding=False, verbose=False)["input_ids"]


class Piece(NamedTuple):
    """Text to encode in one call: a whole document or part of one. `nbytes` counts the UTF-8 bytes
    of the source text it stands for (a space dropped at a cut included)."""

    text: str
    last: bool
    doc: tuple[int, int]
    nbytes: int


SPACE_CUT = re.compile(r"[A-Za-z](?= [A-Za-z])")  # cut between the letter and the space
NEWLINE_CUT = re.compile(r"\S\n(?=\S)")  # cut after the newline


class Cutter:
    """Where a long document may be cut so that encoding the pieces gives exactly the ids of
    encoding it whole.

    A cut goes inside `a Word` (ASCII letter, one space, ASCII letter), before the space. The
    pre-tokenizers of byte-level BPEs (GPT-2's regex, Llama-3's, Qwen2's, ByteLevel) and of
    WordPiece all end a pre-token after the letter and start the next one at the space, with no
    look-behind, so the halves encode as they did inside the whole; an ASCII character at the cut
    never combines with its neighbour under Unicode normalisation. Tokenizers that put a space or
    '▁' in front of every text (SentencePiece-style Metaspace, add_prefix_space) would add one
    at each cut: for them the space is dropped and the tokenizer adds it back. Where the pieces of
    a probe text do not encode like the whole, a cut after a newline between non-spaces (CJK text
    has no spaces) is not used. Both choices are made by encoding probes, not by reading the
    tokenizer's configuration."""

    PROBE = "It was the best of times, it was the worst of times.\nIt was the age of wisdom:\nthe age of foolishness"

    def __init__(self, encode: Callable[[list[str]], list[list[int]]] | None = None):
        self.drop_space, self.newline = False, True
        self.forced = 0  # cuts made with no safe point within MAX_PIECE_CHARS (meta.json's document_cuts)
        if encode is not None:
            whole = encode([self.PROBE])[0]
            self.drop_space = not self._agrees(encode, whole, SPACE_CUT, 0) and self._agrees(encode, whole, SPACE_CUT, 1)
            self.newline = self._agrees(encode, whole, NEWLINE_CUT, 0)

    def _agrees(self, encode, whole: list[int], pattern: re.Pattern, skip: int) -> bool:
        cuts = [m.end() for m in pattern.finditer(self.PROBE)]
        texts = [self.PROBE[a + (skip if a else 0):b] for a, b in zip([0] + cuts, cuts + [len(self.PROBE)])]
        return [i for ids in encode(texts) for i in ids] == whole

    def find(self, text: str, start: int) -> int | None:
        """The first safe cut at or after `start`, or None."""
        m = SPACE_CUT.search(text, start)
        best = m.end() if m else None
        if self.newline:
            for n in NEWLINE_CUT.finditer(text, start, best or len(text)):
                if not unicodedata.combining(text[n.end()]):
                    return n.end()
        return best

    def resume_at(self, text: str, cut: int) -> int:
        """Where the next piece starts: at the cut, or past the space the tokenizer will add back."""
        return cut + 1 if self.drop_space and text.startswith(" ", cut) else cut


def pieces(parts: Iterator[DocPart], cutter: Cutter) -> Iterator[Piece]:
    """Documents as pieces of about PIECE_CHARS, cut where `cutter` allows. Memory is bounded by
    MAX_PIECE_CHARS whatever the document's size; cuts that had no safe point are counted in cutter.forced."""
    buf, pos = "", 0
    for text, last, doc in parts:
        buf = buf[pos:] + text if pos < len(buf) else text
        pos = 0
        while len(buf) - pos > PIECE_CHARS:
            cut = cutter.find(buf, pos + PIECE_CHARS)
            if cut is None:
                if len(buf) - pos < MAX_PIECE_CHARS:
                    break  # read more of the document before cutting
                cut = pos + PIECE_CHARS
                cutter.forced += 1
            nxt = cutter.resume_at(buf, cut)
            yield Piece(buf[pos:cut], False, doc, len(buf[pos:nxt].encode("utf-8")))
            pos = nxt
        if last:
            yield Piece(buf[pos:], True, doc, len(buf[pos:].encode("utf-8")))
            buf, pos = "", 0


def batched(items: Iterator[Piece], max_chars: int) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(parts: Iterator[Piece], encoder: Encoder, eos: int, dtype: np.dtype, out_file,
                  picker: ValidPicker, progress, fit: FitCounter) -> dict:
    """Encode every piece, append EOS after each document, write ids to out_file; record the token
    ranges of valid documents and count the tokenizer's fit."""
    n_docs = n_tokens = total_bytes = 0
    doc_start = doc_bytes = 0
    valid_ranges: list[tuple[int, int, int]] = []  # (start, end, utf8 bytes) of each valid document
    with ThreadPoolExecutor(1) as reader:  # the next batch is read while this one is encoded
        batches = batched(parts, BATCH_CHARS)
        pending = reader.submit(next, batches, None)
        while (batch := pending.result()) is not None:
            pending = reader.submit(next, batches, None)
            encoded = encoder.encode([p.text for p in batch])
            lengths = np.fromiter((len(ids) + p.last for ids, p in zip(encoded, batch)), dtype=np.int64,
                                  count=len(batch))
            flat = np.empty(int(lengths.sum()), dtype=dtype)
            pos = 0
            batch_bytes = 0
            for ids, piece, length in zip(encoded, batch, lengths.tolist()):
                flat[pos:pos + len(ids)] = ids
                pos += length
                doc_bytes += piece.nbytes
                batch_bytes += piece.nbytes
                if piece.last:
                    flat[pos - 1] = eos
                    end = n_tokens + pos
                    if picker.is_valid(piece.doc):
                        valid_ranges.append((doc_start, end, doc_bytes))
                    n_docs += 1
                    doc_start, doc_bytes = end, 0
            out_file.write(flat.tobytes())
            fit.add(flat, sum(p.last for p in batch))
            n_tokens += pos
            total_bytes += batch_bytes
            progress.update(batch_bytes)
    return {"documents": n_docs, "tokens": n_tokens, "bytes": total_bytes, "valid_ranges": valid_ranges}
