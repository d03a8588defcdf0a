"""Tokenization at scale: long documents encoded in pieces give the ids of the whole, every token is
kept whatever the tokenizer.json says, implausible output is refused, and shards merge exactly."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WORDS, make_documents
from tokenization.corpus import DocPart
from tokenization.encode import MAX_PIECE_CHARS, Cutter, pieces
from tokenization.prepare import main
from tokenization.tokenizer import keep_every_token

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
EXTRAS = ["\r\n", "\r\n\r\n", "  \n", "\n\n\n", " naïve café 東京タワー\n", "e\u0301tude ", "12345 ", "\t", "it's ",
          "don't\n", "🙂 ", "\u2028", "    indented", "CamelCase", "!!!\n", " (a) ", "x\n\ny"]


def long_document(n_chars: int, seed: int = 0) -> str:
    """Prose-like text with the shapes that break naive cutting: CRLF, runs of newlines and spaces,
    combining accents, CJK, emoji, digits, contractions."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        words = " ".join(rng.choice(WORDS).capitalize() if rng.random() < 0.1 else rng.choice(WORDS)
                         for _ in range(rng.randint(1, 60)))
        piece = words + rng.choice([". ", ", ", "; "]) + rng.choice(EXTRAS)
        out.append(piece)
        size += len(piece)
    return "".join(out)


def build_tokenizer(path: Path, kind: str, corpus: list[str]) -> Path:
    """Small trained tokenizers with the pre-tokenization of real families, saved as HF folders."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=600, special_tokens=["[UNK]", "[SEP]"])
        tok.train_from_iterator(corpus, trainer=trainer)
        tok.enable_truncation(max_length=16)
        tok.enable_padding(pad_id=0, pad_token="[UNK]", length=24)
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]").save_pretrained(str(path))
        return path
    tok = Tokenizer(models.BPE(byte_fallback=kind == "sentencepiece", ignore_merges=kind == "llama3"))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
    elif kind == "llama3":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
    elif kind == "sentencepiece":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["</s>"], initial_alphabet=alphabet)
    tok.train_from_iterator(corpus, trainer=trainer)
    if kind == "sentencepiece":  # then encode as Llama-2 / Mistral tokenizer.json files do: '▁' put in front
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(str(path))
    return path


def encode_fn(tok_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    keep_every_token(tok)
    backend = tok.backend_tokenizer
    return backend, lambda texts: [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


@pytest.fixture(scope="module")
def doc() -> str:
    return long_document(3_000_000)


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "sentencepiece", "wordpiece"])
def test_pieces_encode_like_the_whole_document(tmp_path, doc, kind):
    backend, encode = encode_fn(build_tokenizer(tmp_path / kind, kind, [long_document(200_000, seed=1)]))
    whole = backend.encode(doc, add_special_tokens=False).ids
    cutter = Cutter(encode)
    parts = [DocPart(doc[i:i + 300_000], i + 300_000 >= len(doc), (0, 0)) for i in range(0, len(doc), 300_000)]
    out = list(pieces(iter(parts), cutter))
    assert len(out) > 40 and cutter.forced == 0 and max(len(p.text) for p in out) < MAX_PIECE_CHARS
    assert sum(p.nbytes for p in out) == len(doc.encode("utf-8"))
    assert cutter.drop_space == (kind == "sentencepiece")
    chunked = [i for ids in encode([p.text for p in out]) for i in ids]
    assert chunked == whole


def test_trained_bpe_prepare_of_one_huge_txt_document_equals_whole_encoding(tmp_path):
    text = long_document(2_500_000, seed=4)
    corpus = tmp_path / "input.txt"
    corpus.write_bytes(text.encode("utf-8"))
    assert main([str(corpus), "--out", str(tmp_path / "d"), "--vocab_size", "600"]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["documents"] == 1 and meta["split"] == "tail" and meta["document_cuts"]["forced"] == 0
    backend, _ = encode_fn(tmp_path / "d" / "tokenizer")
    ids = np.concatenate([np.load(tmp_path / "d" / "train_ids.npy"), np.load(tmp_path / "d" / "valid_ids.npy")])
    assert ids.tolist() == backend.encode(text, add_special_tokens=False).ids + [meta["eos_token_id"]]
    assert meta["train_bytes"] + meta["valid_bytes"] == len(text.encode("utf-8"))


def test_text_without_any_safe_cut_is_cut_anyway_and_counted(capsys):
    text = "x" * (MAX_PIECE_CHARS + 10)
    cutter = Cutter()
    out = list(pieces(iter([DocPart(text, True, (0, 0))]), cutter))
    assert cutter.forced == 1 and "".join(p.text for p in out) == text


def test_truncation_and_padding_in_tokenizer_json_are_ignored(tmp_path, capsys):
    docs = make_documents(60, min_words=80, max_words=120)
    tok_dir = build_tokenizer(tmp_path / "bert", "wordpiece", docs)
    assert json.loads((tok_dir / "tokenizer.json").read_text())["truncation"]["max_length"] == 16
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert main([str(corpus), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d")]) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    backend, _ = encode_fn(tok_dir)
    expected = sum(len(backend.encode(d, add_special_tokens=False).ids) + 1 for d in docs)
    assert expected > 60 * 80
    assert meta["train_tokens"] + meta["valid_tokens"] == expected
    assert 1 < meta["bytes_per_token"] < 10


def test_implausibly_few_tokens_are_refused(tmp_path, capsys):
    from tests.conftest import build_wordlevel_tokenizer

    tok_dir = build_wordlevel_tokenizer(tmp_path / "tok", ["unrelated", "words"])
    corpus = tmp_path / "c.txt"
    corpus.write_text(long_document(50_000).replace(" ", "_"), encoding="utf-8")
    assert main([str(corpus), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drops text" in err[0] and not (tmp_path / "d").exists()


def test_misspelt_or_absent_separator_is_refused(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(make_documents(30)), encoding="utf-8")
    assert main([str(corpus), "--doc_separator", "blanks", "--out", str(tmp_path / "a")]) == 2
    assert "did you mean 'blank'" in capsys.readouterr().err
    assert main([str(corpus), "--doc_separator", "<|endoftext|>", "--out", str(tmp_path / "b")]) == 2
    assert "never occurs" in capsys.readouterr().err and not (tmp_path / "b").exists()


def _prepare_shards(tmp_path, inputs, n, tok, extra=()):
    dirs = []
    for i in range(n):
        d = tmp_path / f"shard_{i}"
        assert main([*map(str, inputs), "--tokenizer", str(tok), "--out", str(d), "--num_shards", str(n),
                     "--shard_index", str(i), "--dedup", "none", *extra]) == 0
        dirs.append(d)
    return dirs


def _all_ids(d: Path) -> tuple[np.ndarray, np.ndarray]:
    meta = json.loads((d / "meta.json").read_text())
    roots = [(d / s).resolve() for s in meta["shards"]] if "shards" in meta else [d]
    return tuple(np.concatenate([np.load(r / f"{split}_ids.npy") for r in roots]) for split in ("train", "valid"))


def test_sharded_by_file_then_merged_equals_unsharded(tmp_path, data_dir):
    from tokenization.merge import main as merge_main

    files = []
    for i in range(5):
        f = tmp_path / f"part{i}.jsonl"
        f.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(40 + 10 * i, seed=i)),
                     encoding="utf-8")
        files.append(f)
    tok = data_dir / "tokenizer"
    assert main([*map(str, files), "--tokenizer", str(tok), "--out", str(tmp_path / "whole")]) == 0
    shards = _prepare_shards(tmp_path, files, 3, tok)
    assert {json.loads((d / "meta.json").read_text())["shard"]["by"] for d in shards} == {"file"}
    assert merge_main([*map(str, reversed(shards)), "--out", str(tmp_path / "merged")]) == 0
    for a, b in zip(_all_ids(tmp_path / "whole"), _all_ids(tmp_path / "merged")):
        assert np.array_equal(a, b)
    meta = json.loads((tmp_path / "merged" / "meta.json").read_text())
    whole = json.loads((tmp_path / "whole" / "meta.json").read_text())
    for key in ("train_tokens", "valid_tokens", "train_bytes", "valid_bytes", "documents", "tokenizer_sha256"):
        assert meta[key] == whole[key], key
    assert not list((tmp_path / "merged").glob("*.npy"))


def test_sharded_by_document_keeps_every_document_and_the_same_split(tmp_path, data_dir):
    from tokenization.merge import main as merge_main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(90)), encoding="utf-8")
    tok = data_dir / "tokenizer"
    assert main([str(corpus), "--tokenizer", str(tok), "--out", str(tmp_path / "whole")]) == 0
    shards = _prepare_shards(tmp_path, [corpus], 2, tok)
    assert merge_main([*map(str, shards), "--out", str(tmp_path / "merged")]) == 0
    eos = json.loads((tmp_path / "whole" / "meta.json").read_text())["eos_token_id"]
    for a, b in zip(_all_ids(tmp_path / "whole"), _all_ids(tmp_path / "merged")):
        docs = lambda ids: sorted(tuple(x) for x in np.split(ids, np.flatnonzero(ids == eos) + 1) if len(x))
        assert docs(a) == docs(b)


def test_merge_refuses_other_tokenizer_and_missing_shards(tmp_path, data_dir, capsys):
    from tests.conftest import build_wordlevel_tokenizer
    from tokenization.merge import main as merge_main

    corpus = tmp_path / "c.jsonl"
    docs = make_documents(60)
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    shards = _prepare_shards(tmp_path, [corpus], 2, data_dir / "tokenizer")
    other = build_wordlevel_tokenizer(tmp_path / "wl", " ".join(docs).split())
    assert main([str(corpus), "--tokenizer", str(other), "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert merge_main([str(shards[0]), str(tmp_path / "other"), "--out", str(tmp_path / "m")]) == 2
    assert "every shard" in capsys.readouterr().err
    assert merge_main([str(data_dir), str(tmp_path / "other"), "--out", str(tmp_path / "m")]) == 2
    assert "another tokenizer" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_jsonl_record_longer_than_a_read_and_no_final_newline(tmp_path, data_dir):
    docs = [long_document(2_500_000, seed=7), "short one", long_document(3000, seed=8)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": docs[0]}) + "\r\n" + json.dumps({"text": docs[1]}) + "\n\n"
                      + json.dumps({"text": docs[2]}), encoding="utf-8")
    assert main([str(corpus), "--tokenizer", str(data_dir / "tokenizer"), "--out", str(tmp_path / "d")]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    backend, _ = encode_fn(data_dir / "tokenizer")
    ids = np.concatenate([np.load(tmp_path / "d" / "train_ids.npy"), np.load(tmp_path / "d" / "valid_ids.npy")])
    expected = [i for d in docs for i in backend.encode(d, add_special_tokens=False).ids + [meta["eos_token_id"]]]
    assert meta["documents"] == 3 and ids.tolist() == expected
