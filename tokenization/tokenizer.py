"""The tokenizer of a preparation: load it as AutoTokenizer does, keep every token, its fingerprint
(what meta.json records and training compares), the id that ends a document and the id dtype.
accel_pretrain imports the fingerprint from here, never from the CLI modules."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from . import PrepareError

TRAINED_BPE = "byte-level BPE trained on the corpus"  # meta.json's tokenizer name when none was given


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


def unknown_id(tok) -> int | None:
    """The id the tokenizer emits for text it cannot represent, or None. Read from the Rust model when
    it names one: GPT-2's and our trained BPE's unk_token is their EOS, which a byte-level model never
    emits, so tok.unk_token_id would count literal '<|endoftext|>' strings as unknown text."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend.model, "unk_token"):  # BPE, WordPiece, WordLevel; not Unigram
        return backend.token_to_id(backend.model.unk_token) if backend.model.unk_token else None
    return tok.unk_token_id
