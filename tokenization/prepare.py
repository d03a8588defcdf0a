"""CLI: documents -> token ids -> train_ids.npy, valid_ids.npy, meta.json, tokenizer/.

    python -m tokenization.prepare corpus.txt [more inputs] [--tokenizer gpt2] [--out data/]

Memory stays bounded: documents stream in, ids stream out to a flat file on disk, and the final
split copies ranges of that file into memory-mapped .npy files. Output appears atomically.
"""
from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from . import PrepareError, __version__
from .corpus import DocPart, ReadOptions, Source, iter_documents, resolve_sources, total_file_bytes

BATCH_CHARS = 2_000_000  # text per encode call: large enough to keep every core busy
PIECE_CHARS = 1 << 16  # a longer document is encoded in pieces of about this size, cut at safe points
MAX_PIECE_CHARS = 1 << 22  # with no safe point in this much text, a piece is cut anyway (counted in meta.json)
COPY_TOKENS = 1 << 24  # tokens per copy when splitting, bounds memory in the final pass
MAX_BYTES_PER_TOKEN = 100  # fewer tokens than one per this many bytes means the tokenizer drops text
TRAINED_BPE = "byte-level BPE trained on the corpus"  # meta.json's tokenizer name when none was given
WHITESPACE = " \t\n\r\f\v"  # ASCII whitespace: what indentation and line breaks are made of
WHITESPACE_ONLY, SINGLE_SPACE, UNKNOWN = 1, 2, 4  # bits of a token's class in the fit lookup table
# When prepare warns that the tokenizer fits the corpus badly (figures measured with GPT-2, Qwen2 and our BPE):
MAX_SINGLE_SPACE_SHARE = 0.05  # prose, and code with a fitting tokenizer: <1% lone spaces; GPT-2 on code: 20-32%
MAX_WHITESPACE_SHARE = 0.20  # newline and indent tokens: 5-8% in prose, up to 15% in tab-indented code with our BPE
MAX_UNK_SHARE = 0.001  # byte-level tokenizers have none; one in a thousand already loses a word every few lines
MIN_BYTES_PER_TOKEN = 2.0  # English or code under a fitting tokenizer: 3.4-4.4; below 2 words are cut into bytes
SEPARATOR_WORDS = ("none", "blank", "line")


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
    p.add_argument("--num_shards", type=int, default=1,
                   help="split the work across this many machines or processes (needs --tokenizer)")
    p.add_argument("--shard_index", type=int, default=0, help="which shard this process prepares (0-based)")
    args = p.parse_args(argv)
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise PrepareError(f"--shard_index {args.shard_index} must be in [0, --num_shards {args.num_shards})")
    if args.num_shards > 1 and args.tokenizer is None:
        raise PrepareError("sharded preparation needs one tokenizer for every shard: prepare a sample first and pass "
                           "its tokenizer folder (--tokenizer SAMPLE_DIR/tokenizer), or name an AutoTokenizer")
    sep = args.doc_separator
    close = difflib.get_close_matches(sep.lower(), SEPARATOR_WORDS, n=1, cutoff=0.6)
    if sep not in SEPARATOR_WORDS and close and re.fullmatch(r"[A-Za-z]+", sep):
        raise PrepareError(f"--doc_separator {sep!r} would be a literal separator line; did you mean {close[0]!r}?")
    if not 0.0 < args.val_fraction < 0.5:
        raise PrepareError(f"--val_fraction {args.val_fraction} must be between 0 and 0.5")
    if args.num_proc < 1:
        raise PrepareError("--num_proc must be at least 1")
    return args


def load_tokenizer(name_or_path: str):
    """AutoTokenizer for a hub name or folder, with a one-line error when it cannot be had."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:  # OSError, ValueError, hub errors: all mean "cannot load this"
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only local folders and cached names work)" if offline else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PrepareError(f"cannot load tokenizer {name_or_path!r}{hint}: {first}") from None
    return tok


def keep_every_token(tok) -> None:
    """Truncation or padding set in a tokenizer.json (common in BERT-family and embedding models)
    would cut every document to max_length or pad it: both are off for preparation. The saved
    tokenizer folder keeps the user's settings."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        backend.no_truncation()
        backend.no_padding()


LEGACY_SECTIONS = ("model", "normalizer", "pre_tokenizer")  # what meta.json's tokenizer_sha256 hashes
ENCODING_SECTIONS = ("model", "normalizer", "pre_tokenizer", "added_tokens")  # what turns text into ids
SLOW_SETTINGS = ("do_lower_case", "add_prefix_space", "legacy", "remove_space", "keep_accents", "sp_model_kwargs",
                 "split_special_tokens")  # the attributes of a Python tokenizer that change its ids


def _sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def legacy_sha256(tokenizer_json: str) -> str:
    """meta.json's tokenizer_sha256 (kept as data made before tokenizer_fingerprint carries only it):
    the sha256 of the model, normalizer and pre-tokenizer sections of a tokenizer.json, given as text."""
    spec = json.loads(tokenizer_json)
    return _sha256_json({k: spec.get(k) for k in LEGACY_SECTIONS})


def tokenizer_sha256(tok, tok_dir: Path) -> str:
    """meta.json's tokenizer_sha256, unchanged since before tokenizer_fingerprint: legacy_sha256 of the
    tokenizer.json saved in the data's tokenizer/ folder as `tokenizers` writes it; the vocabulary when
    there is no tokenizer.json. Shards and mixtures compare it where tokenizer_fingerprint is missing."""
    path = tok_dir / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        return legacy_sha256(Tokenizer.from_file(str(path)).to_str())
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()


def _added_token(token) -> dict:
    if isinstance(token, str):
        return {"content": token}
    return {k: getattr(token, k, None) for k in ("content", "single_word", "lstrip", "rstrip", "normalized", "special")}


def _plain(value):
    """JSON-able and free of memory addresses: settings made of str, numbers, bools, lists and dicts."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (str, int, float, bool)) else type(value).__name__


def tokenizer_fingerprint(tok) -> str:
    """meta.json's tokenizer_fingerprint: the sha256 of how the tokenizer AutoTokenizer LOADED turns text
    into ids, which prepare writes and evaluate / train --init_from compare (check_same_tokenizer in
    accel_pretrain/data.py calls this very function on what AutoTokenizer loads from the model's folder).

    A fast tokenizer (what prepare encodes with: its Rust backend, special tokens not added) is its
    backend's model (vocabulary, merges), normalizer, pre-tokenizer and added tokens, as `to_str()`
    serialises them, plus whether special tokens are split; post-processor, decoder, truncation and
    padding leave the ids of text alone and are left out, and so is the Python class (transformers 5
    may load one folder as another class: the pipeline it builds is what counts). A tokenizer without a
    Rust backend is its class name, vocabulary, added tokens, settings in SLOW_SETTINGS and, for
    sentencepiece, the model proto. Keys are sorted: the same tokenizer gives the same hex digest in
    every process and on every machine (with the same transformers and tokenizers)."""
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        spec = json.loads(backend.to_str())
        blob = {k: spec.get(k) for k in ENCODING_SECTIONS}
        blob["encode_special_tokens"] = bool(getattr(backend, "encode_special_tokens", False))
        return _sha256_json({"fast": blob})
    try:
        vocab = sorted(tok.get_vocab().items())
    except (AttributeError, NotImplementedError):
        vocab = None
    added = getattr(tok, "added_tokens_decoder", None) or {}
    blob = {"class": type(tok).__name__, "vocab": vocab,
            "added_tokens": [[i, _added_token(t)] for i, t in sorted(added.items())],
            "settings": {k: _plain(getattr(tok, k)) for k in SLOW_SETTINGS if hasattr(tok, k)}}
    sp = getattr(tok, "sp_model", None)
    if sp is not None and hasattr(sp, "serialized_model_proto"):
        blob["sentencepiece"] = hashlib.sha256(sp.serialized_model_proto()).hexdigest()
    return _sha256_json({"slow": blob})


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


def unknown_id(tok) -> int | None:
    """The id the tokenizer emits for text it cannot represent, or None. Read from the Rust model when
    it names one: GPT-2's and our trained BPE's unk_token is their EOS, which a byte-level model never
    emits, so tok.unk_token_id would count literal '<|endoftext|>' strings as unknown text."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend.model, "unk_token"):  # BPE, WordPiece, WordLevel; not Unigram
        return backend.token_to_id(backend.model.unk_token) if backend.model.unk_token else None
    return tok.unk_token_id


def token_classes(tok, size: int) -> np.ndarray:
    """One byte per id: WHITESPACE_ONLY, SINGLE_SPACE and UNKNOWN bits, so the fit of a batch is one
    lookup and one bincount. Each id is decoded once, after an anchor token ('a'): decoders that strip
    the leading space of a text (SentencePiece's '▁' first) would decode a lone space to nothing.
    A fast tokenizer decodes every id in one Rust call (0.5 s for Qwen2's 151,936 ids on 2 cores)."""
    anchor = tok.encode("a", add_special_tokens=False)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        prefix = backend.decode(anchor, skip_special_tokens=False)
        texts = backend.decode_batch([anchor + [i] for i in range(size)], skip_special_tokens=False)
    else:
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        prefix, texts = decode(anchor), [decode(anchor + [i]) for i in range(size)]
    classes = np.zeros(size, dtype=np.uint8)
    for i, text in enumerate(texts):
        piece = text.removeprefix(prefix)
        if piece and not piece.strip(WHITESPACE):
            classes[i] = WHITESPACE_ONLY | (SINGLE_SPACE if piece == " " else 0)
    unk = unknown_id(tok)
    if unk is not None:
        classes[unk] |= UNKNOWN
    return classes


class FitCounter:
    """How well the tokenizer fits the corpus, counted on each batch's ids as they are written
    (no second pass over the corpus): whitespace-only tokens, lone spaces and unknown tokens."""

    def __init__(self, tok, size: int, eos: int):
        # len(tok) can be below the largest id where added tokens leave gaps: size for every id it has
        self.classes = token_classes(tok, max(size, max(tok.get_vocab().values(), default=-1) + 1))
        self.eos_class = int(self.classes[eos])
        self.counts = np.zeros(8, dtype=np.int64)  # tokens per class value (a combination of bits)

    def add(self, ids: np.ndarray, separators: int) -> None:
        """Count a batch; the `separators` EOS ids appended after documents are not text."""
        self.counts += np.bincount(self.classes[ids], minlength=8)
        self.counts[self.eos_class] -= separators

    def totals(self) -> dict[str, int]:
        with_bit = lambda bit: int(self.counts[(np.arange(8) & bit) != 0].sum())
        return {"whitespace_only_tokens": with_bit(WHITESPACE_ONLY), "single_space_tokens": with_bit(SINGLE_SPACE),
                "unk_tokens": with_bit(UNKNOWN)}


def tokenizer_fit(counts: dict[str, int], text_tokens: int, text_bytes: int) -> dict:
    """meta.json's tokenizer_fit: the counts (so merged shards add them exactly) and the shares of
    text tokens (EOS separators left out, as in bytes_per_token)."""
    n = max(text_tokens, 1)
    return {"text_tokens": text_tokens, **counts, "bytes_per_token": round(text_bytes / n, 4),
            "whitespace_only_share": round(counts["whitespace_only_tokens"] / n, 6),
            "single_space_share": round(counts["single_space_tokens"] / n, 6),
            "unk_share": round(counts["unk_tokens"] / n, 6)}


def fit_report(fit: dict, trained: bool) -> tuple[str, list[str]]:
    """The summary line, and a warning with a remedy for each way the tokenizer fits the corpus badly."""
    line = (f"tokenizer fit: {fit['bytes_per_token']:.2f} bytes/token, {fit['whitespace_only_share']:.1%} "
            f"whitespace-only tokens ({fit['single_space_share']:.1%} single spaces), {fit['unk_tokens']:,} unknown")
    own = "omit --tokenizer to train a byte-level BPE on this corpus (the default)"
    longer = "raise --vocab_size so that the trained BPE learns longer tokens"
    warnings = []
    whitespace = (fit["single_space_share"] > MAX_SINGLE_SPACE_SHARE
                  or fit["whitespace_only_share"] > MAX_WHITESPACE_SHARE)
    if whitespace:
        remedy = longer if trained else (f"{own}, or use a tokenizer with tokens for runs of spaces such as Qwen2's "
                                         "(--tokenizer Qwen/Qwen2.5-0.5B) or Llama-3's")
        warnings.append(f"{fit['whitespace_only_share']:.1%} of the tokens are whitespace only "
                        f"({fit['single_space_share']:.1%} single spaces): a model trained on these ids learns "
                        f"mostly to write whitespace; {remedy}")
    if fit["unk_share"] > MAX_UNK_SHARE:
        warnings.append(f"{fit['unk_share']:.2%} of the tokens are unknown ({fit['unk_tokens']:,}): the text they "
                        f"stand for is lost to the model; {own}, or use a byte-level tokenizer such as Qwen2's "
                        "(--tokenizer Qwen/Qwen2.5-0.5B), which has no unknown token")
    if fit["bytes_per_token"] < MIN_BYTES_PER_TOKEN and not whitespace:  # lone spaces also make few bytes per token
        remedy = longer if trained else f"{own}, or use a tokenizer made for the corpus's language"
        warnings.append(f"only {fit['bytes_per_token']:.2f} bytes per token: most words are cut into pieces of a "
                        f"byte or two, so each training window holds little text; {remedy}")
    return line, warnings


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


def pieces(parts: Iterator[DocPart], cutter: Cutter, forced: list[int]) -> Iterator[Piece]:
    """Documents as pieces of about PIECE_CHARS, cut where `cutter` allows. Memory is bounded by
    MAX_PIECE_CHARS whatever the document's size; cuts that had no safe point are counted in forced[0]."""
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
                forced[0] += 1
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


def shard_plan(sources: list[Source], index: int, count: int) -> tuple[list[Source], tuple[int, int] | None, str]:
    """Which inputs this shard reads and which of their documents it keeps.

    By file when there are at least as many files as shards: runs of consecutive files of about
    equal size, so merging the shards in order gives the unsharded corpus token for token. Else by
    document: document i of the stream goes to shard i mod count (every shard reads every input)."""
    if count == 1:
        return sources, None, "none"
    if len(sources) >= count and all(s.kind == "file" for s in sources):
        total = sum(s.size_bytes or 0 for s in sources) or 1
        owner, before = [], 0
        for s in sources:
            owner.append(min(count - 1, int((before + (s.size_bytes or 0) / 2) * count / total)))
            before += s.size_bytes or 0
        if set(owner) == set(range(count)):
            return [s for s, o in zip(sources, owner) if o == index], None, "file"
    return sources, (index, count), "document"


def prepare(args: argparse.Namespace) -> Path:
    from tqdm.auto import tqdm

    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.overwrite:
        raise PrepareError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    opts = ReadOptions(args.text_field, args.doc_separator, args.errors, args.dataset_config, args.split)
    all_sources = resolve_sources(args.inputs, opts)
    sources, doc_shard, shard_by = shard_plan(all_sources, args.shard_index, args.num_shards)
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

            texts = (p.text for p in pieces(iter_documents(sources, opts), Cutter(), [0]))
            train_bpe(texts, args.vocab_size, tok_dir)
            tok = load_tokenizer(str(tok_dir))
            tokenizer_name = f"{TRAINED_BPE} (vocab {args.vocab_size})"
        else:
            tok = load_tokenizer(args.tokenizer)
            tok.save_pretrained(str(tok_dir))
            tokenizer_name = args.tokenizer
        keep_every_token(tok)
        eos = separator_id(tok)
        vocab_size = len(tok)
        dtype = id_dtype(vocab_size)
        encoder = Encoder(tok, tok_dir, args.num_proc)
        cutter = Cutter(encoder.encode)
        fingerprint = tokenizer_fingerprint(tok)
        picker = ValidPicker(args.val_fraction, args.seed)
        fit = FitCounter(tok, vocab_size, eos)

        t0 = time.perf_counter()
        forced = [0]
        bar = tqdm(total=total_file_bytes(sources), unit="B", unit_scale=True, desc="tokenize", disable=None)
        with open(tmp / "all.bin", "wb") as f:
            stats = encode_stream(pieces(iter_documents(sources, opts, doc_shard), cutter, forced), encoder, eos,
                                  dtype, f, picker, bar, fit)
        bar.close()
        if stats["documents"] == 0 and doc_shard is not None:
            raise PrepareError(f"shard {args.shard_index} of {args.num_shards} got no document: the corpus has fewer "
                               "documents than shards (a .txt is one document unless --doc_separator splits it)")
        text_tokens = stats["tokens"] - stats["documents"]
        if stats["bytes"] > MAX_BYTES_PER_TOKEN * max(text_tokens, 1):
            raise PrepareError(
                f"the tokenizer gave {text_tokens:,} tokens for {stats['bytes']:,} bytes of text (one per "
                f"{stats['bytes'] / max(text_tokens, 1):,.0f} bytes; real text gives one per 2 to 6): it drops text, "
                "e.g. unknown words or a vocabulary for another language; choose another --tokenizer")
        fit_stats = tokenizer_fit(fit.totals(), text_tokens, stats["bytes"])
        train_r, valid_r, split = split_ranges(stats, picker, args.val_fraction)
        n_train, train_max = write_split(tmp / "all.bin", dtype, train_r, tmp / "train_ids.npy")
        n_valid, valid_max = write_split(tmp / "all.bin", dtype, valid_r, tmp / "valid_ids.npy")
        if split == "documents":
            valid_bytes = sum(b for _, _, b in stats["valid_ranges"])
            valid_docs = len(valid_r)
        else:
            valid_bytes = tail_bytes(tok, tmp / "all.bin", dtype, *valid_r[0])
            valid_docs = 0
        (tmp / "all.bin").unlink()
        meta = {
            "version": 1,
            "package_version": __version__,
            "tokenizer": tokenizer_name,
            "tokenizer_sha256": tokenizer_sha256(tok, tok_dir),
            "tokenizer_fingerprint": fingerprint,
            "vocab_size": vocab_size,
            "eos_token_id": eos,
            "dtype": dtype.name,
            "train_tokens": n_train,
            "valid_tokens": n_valid,
            "max_token_id": {"train": train_max, "valid": valid_max},
            "train_bytes": stats["bytes"] - valid_bytes,
            "valid_bytes": valid_bytes,
            "bytes_per_token": fit_stats["bytes_per_token"],
            "documents": stats["documents"],
            "train_documents": stats["documents"] - valid_docs,
            "valid_documents": valid_docs,
            "split": split,
            "val_fraction": args.val_fraction,
            "seed": args.seed,
            "document_cuts": {"forced": forced[0], "space_dropped": cutter.drop_space, "newline": cutter.newline},
            "tokenizer_fit": fit_stats,
            "sources": [s.info() for s in sources],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if args.num_shards > 1:
            meta["shard"] = {"index": args.shard_index, "count": args.num_shards, "by": shard_by}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _publish(tmp, out)
    finally:
        if encoder is not None:
            encoder.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if forced[0]:
        print(f"warning: {forced[0]} cut(s) inside text with no space or newline for {MAX_PIECE_CHARS:,} characters; "
              "ids near those cuts may differ from encoding the document whole", file=sys.stderr)
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


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def print_fit(fit: dict, trained: bool) -> None:
    """The fit summary on stdout, its warnings on stderr (shared with merge)."""
    line, warnings = fit_report(fit, trained)
    print(line)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


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
        f"({meta['dtype']}, vocab {meta['vocab_size']:,}, {plural(meta['documents'], 'document')}, "
        f"split by {meta['split']}, {meta['bytes_per_token']:.2f} bytes per token)"
    )
    print_fit(meta["tokenizer_fit"], trained=args.tokenizer is None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
