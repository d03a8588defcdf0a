"""How well the tokenizer fits the corpus: whitespace-only tokens, lone spaces, unknown tokens and
bytes per token, counted while the ids are written; the summary line and its warnings."""
from __future__ import annotations

import sys

import numpy as np

from . import PrepareError
from .tokenizer import unknown_id

MAX_BYTES_PER_TOKEN = 100  # fewer tokens than one per this many bytes means the tokenizer drops text
WHITESPACE = " \t\n\r\f\v"  # ASCII whitespace: what indentation and line breaks are made of
WHITESPACE_ONLY, SINGLE_SPACE, UNKNOWN = 1, 2, 4  # bits of a token's class in the fit lookup table
# When prepare warns that the tokenizer fits the corpus badly (figures measured with GPT-2, Qwen2 and our BPE):
MAX_SINGLE_SPACE_SHARE = 0.05  # prose, and code with a fitting tokenizer: <1% lone spaces; GPT-2 on code: 20-32%
MAX_WHITESPACE_SHARE = 0.20  # newline and indent tokens: 5-8% in prose, up to 15% in tab-indented code with our BPE
MAX_UNK_SHARE = 0.001  # byte-level tokenizers have none; one in a thousand already loses a word every few lines
MIN_BYTES_PER_TOKEN = 2.0  # English or code under a fitting tokenizer: 3.4-4.4; below 2 words are cut into bytes


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


def check_keeps_text(text_tokens: int, text_bytes: int) -> int:
    """Refuse a tokenizer that drops text (far fewer tokens than the bytes call for); returns text_tokens."""
    if text_bytes > MAX_BYTES_PER_TOKEN * max(text_tokens, 1):
        raise PrepareError(
            f"the tokenizer gave {text_tokens:,} tokens for {text_bytes:,} bytes of text (one per "
            f"{text_bytes / max(text_tokens, 1):,.0f} bytes; real text gives one per 2 to 6): it drops text, "
            "e.g. unknown words or a vocabulary for another language; choose another --tokenizer")
    return text_tokens


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


def print_fit(fit: dict, trained: bool) -> None:
    """The fit summary on stdout, its warnings on stderr (shared with merge)."""
    line, warnings = fit_report(fit, trained)
    print(line)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
