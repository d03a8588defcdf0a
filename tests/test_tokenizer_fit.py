"""prepare reports how well the tokenizer fits the corpus (meta.json's tokenizer_fit and one printed
line) and warns when it fits badly: a vocabulary without tokens for runs of spaces on indented code,
unknown tokens, few bytes per token."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import WORDS, build_wordlevel_tokenizer, make_documents
from tests.test_tokenize_scale import build_tokenizer
from tokenization import encode
from tokenization.merge import main as merge_main
from tokenization.fit import SINGLE_SPACE, WHITESPACE_ONLY, token_classes
from tokenization.prepare import main


def indented_documents(n: int, seed: int = 0) -> list[str]:
    """Python-like documents whose lines start with 8 to 16 spaces, as in indented code and docs."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = [" " * rng.choice((8, 12, 16)) + f"{rng.choice(WORDS)} = {rng.choice(WORDS)}({rng.choice(WORDS)})"
                 for _ in range(rng.randint(10, 30))]
        docs.append("def f():\n" + "\n".join(lines) + "\n")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def prose_bpe(tmp_path_factory) -> Path:
    """A GPT-2-like byte-level BPE trained on prose only: like GPT-2, it has no token for a run of spaces."""
    return build_tokenizer(tmp_path_factory.mktemp("tok") / "gpt2", "gpt2", make_documents(300, seed=5))


def run(capsys, *argv) -> tuple[dict, str, str]:
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    out = Path(str(argv[argv.index("--out") + 1]))
    return json.loads((out / "meta.json").read_text())["tokenizer_fit"], captured.out, captured.err


def direct_counts(out: Path) -> dict[str, int]:
    """The fit counted the slow way: every text id of both splits decoded on its own."""
    meta = json.loads((out / "meta.json").read_text())
    ids = np.concatenate([np.load(out / "train_ids.npy"), np.load(out / "valid_ids.npy")])
    ids = ids[ids != meta["eos_token_id"]]
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    text = {int(i): tok.decode([int(i)]) for i in np.unique(ids)}
    pieces = [text[int(i)] for i in ids]
    return {"text_tokens": len(ids), "whitespace_only_tokens": sum(bool(p) and not p.strip(" \t\n") for p in pieces),
            "single_space_tokens": pieces.count(" "), "unk_tokens": 0}


def test_indented_corpus_with_a_tokenizer_without_space_runs_warns(tmp_path, capsys, prose_bpe):
    corpus = write_jsonl(tmp_path / "code.jsonl", indented_documents(60))
    fit, out, err = run(capsys, corpus, "--tokenizer", prose_bpe, "--out", tmp_path / "d")
    expected = direct_counts(tmp_path / "d")
    assert {k: fit[k] for k in expected} == expected
    assert fit["single_space_share"] == round(expected["single_space_tokens"] / expected["text_tokens"], 6) > 0.3
    assert fit["whitespace_only_share"] == round(expected["whitespace_only_tokens"] / expected["text_tokens"], 6)
    assert fit["bytes_per_token"] == json.loads((tmp_path / "d" / "meta.json").read_text())["bytes_per_token"]
    line = f"tokenizer fit: {fit['bytes_per_token']:.2f} bytes/token, {fit['whitespace_only_share']:.1%} " \
           f"whitespace-only tokens ({fit['single_space_share']:.1%} single spaces), 0 unknown"
    assert out.splitlines()[-1] == line
    warning, = [w for w in err.splitlines() if w.startswith("warning:")]
    assert "whitespace only" in warning and "omit --tokenizer" in warning and "--tokenizer Qwen/Qwen2.5-0.5B" in warning

    fit, _, err = run(capsys, corpus, "--vocab_size", 600, "--out", tmp_path / "own")  # the suggested remedy
    assert fit["single_space_share"] < 0.05 and "warning:" not in err


def test_prose_fits_without_warning(tmp_path, capsys, prose_bpe):
    corpus = write_jsonl(tmp_path / "prose.jsonl", make_documents(80, seed=9))
    fit, out, err = run(capsys, corpus, "--tokenizer", prose_bpe, "--out", tmp_path / "d")
    expected = direct_counts(tmp_path / "d")
    assert {k: fit[k] for k in expected} == expected
    assert fit["single_space_share"] < 0.01 and fit["bytes_per_token"] > 3
    assert "tokenizer fit:" in out and "warning:" not in err


def test_one_long_document_over_many_batches_counts_exactly(tmp_path, capsys, prose_bpe, monkeypatch):
    monkeypatch.setattr(encode, "BATCH_CHARS", 50_000)  # pieces of 64k characters, several batches
    corpus = tmp_path / "one.txt"
    corpus.write_text("".join(indented_documents(600, seed=2)), encoding="utf-8")
    fit, _, _ = run(capsys, corpus, "--tokenizer", prose_bpe, "--out", tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["documents"] == 1 and len(corpus.read_text()) > 4 * 50_000
    expected = direct_counts(tmp_path / "d")
    assert {k: fit[k] for k in expected} == expected


def test_unknown_tokens_are_counted_and_warned(tmp_path, capsys):
    docs = make_documents(60, seed=4)
    tok_dir = build_wordlevel_tokenizer(tmp_path / "wl", [w for w in " ".join(docs).split() if w != "cat"])
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    fit, out, err = run(capsys, corpus, "--tokenizer", tok_dir, "--out", tmp_path / "d")
    ids = np.concatenate([np.load(tmp_path / "d" / "train_ids.npy"), np.load(tmp_path / "d" / "valid_ids.npy")])
    unk = AutoTokenizer.from_pretrained(str(tok_dir)).unk_token_id
    assert fit["unk_tokens"] == int((ids == unk).sum()) > 0 and fit["whitespace_only_tokens"] == 0
    assert f"{fit['unk_tokens']:,} unknown" in out
    assert any(w.startswith("warning:") and "unknown" in w for w in err.splitlines())


def test_merged_shards_have_the_fit_of_the_unsharded_corpus(tmp_path, capsys, prose_bpe):
    corpus = write_jsonl(tmp_path / "c.jsonl", indented_documents(40, seed=1) + make_documents(40, seed=1))
    whole, _, _ = run(capsys, corpus, "--tokenizer", prose_bpe, "--out", tmp_path / "whole")
    shards = []
    for i in range(3):
        fit, _, _ = run(capsys, corpus, "--tokenizer", prose_bpe, "--out", tmp_path / f"s{i}", "--num_shards", 3,
                        "--shard_index", i, "--dedup", "none")
        shards.append(fit)
    assert len({s["whitespace_only_share"] for s in shards}) > 1  # the shares differ, so averaging them would not do
    assert merge_main([*(str(tmp_path / f"s{i}") for i in range(3)), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "meta.json").read_text())["tokenizer_fit"]
    assert merged == whole
    captured = capsys.readouterr()
    assert "tokenizer fit:" in captured.out and "warning:" in captured.err


@pytest.mark.parametrize("kind, space, newline, run",
                         [("gpt2", "Ġ", "Ċ", "ĠĠĠĠ"), ("sentencepiece", "▁", "\n", None)])
def test_whitespace_tokens_are_classed_whatever_the_decoder(tmp_path, kind, space, newline, run):
    """SentencePiece's decoder drops the space of a text's first '▁': classes are read after an anchor."""
    tok = AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path / kind, kind, indented_documents(50))))
    classes = token_classes(tok, len(tok))
    assert classes[tok.convert_tokens_to_ids(space)] == WHITESPACE_ONLY | SINGLE_SPACE
    assert classes[tok.convert_tokens_to_ids(newline)] == WHITESPACE_ONLY
    assert run is None or classes[tok.convert_tokens_to_ids(run)] == WHITESPACE_ONLY
    assert classes[tok.convert_tokens_to_ids(tok.tokenize("def")[0])] == 0 and classes[tok.eos_token_id] == 0
    assert np.count_nonzero(classes & SINGLE_SPACE) == 1
