"""The tokenization stage: round trips, dtypes, input formats, atomic output and every bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.conftest import build_wordlevel_tokenizer, make_documents
from tokenization.prepare import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return code, err


def split_docs(ids: np.ndarray, eos: int) -> list[list[int]]:
    ends = np.flatnonzero(ids == eos)
    assert len(ends) and ends[-1] == len(ids) - 1, "every split must end with EOS"
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [ids[s:e].tolist() for s, e in zip(starts, ends)]


def decoded_documents(out: Path) -> tuple[list[str], list[str], dict]:
    meta = json.loads((out / "meta.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    parts = []
    for split in ("train", "valid"):
        ids = np.load(out / f"{split}_ids.npy", mmap_mode="r")
        assert ids.ndim == 1 and ids.dtype == np.dtype(meta["dtype"])
        assert len(ids) == meta[f"{split}_tokens"]
        parts.append([tok.decode(d) for d in split_docs(np.asarray(ids), meta["eos_token_id"])])
    return parts[0], parts[1], meta


def test_trained_bpe_round_trip(tmp_path, capsys, jsonl_corpus, documents):
    out = tmp_path / "data"
    code, err = run(capsys, jsonl_corpus, "--out", out, "--vocab_size", 400, "--val_fraction", 0.1)
    assert code == 0, err
    train, valid, meta = decoded_documents(out)
    assert sorted(train + valid) == sorted(documents)
    assert valid and train and not set(train) & set(valid)
    assert meta["split"] == "documents" and meta["valid_documents"] == len(valid) == 12
    assert meta["dtype"] == "uint16" and meta["vocab_size"] <= 400
    assert meta["train_bytes"] + meta["valid_bytes"] == sum(len(d.encode()) for d in documents)
    assert meta["valid_bytes"] == sum(len(d.encode()) for d in valid)
    assert meta["sources"][0]["sha256"] and meta["sources"][0]["documents"] == len(documents)
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).eos_token == "<|endoftext|>"


def test_split_is_deterministic_and_seeded(tmp_path, capsys, jsonl_corpus):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run(capsys, jsonl_corpus, "--out", tmp_path / name, "--vocab_size", 300, "--seed", seed)[0] == 0
        outs.append(np.load(tmp_path / name / "valid_ids.npy"))
    assert np.array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


@pytest.mark.parametrize("extra, dtype", [(0, "uint16"), (70_000, "uint32")])
def test_tokenizer_folder_round_trip_and_dtype(tmp_path, capsys, documents, extra, dtype):
    words = " ".join(documents).split()
    tok_dir = build_wordlevel_tokenizer(tmp_path / "tok", words, extra=extra)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(documents) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    code, err = run(capsys, corpus, "--tokenizer", tok_dir, "--doc_separator", "line", "--out", out)
    assert code == 0, err
    train, valid, meta = decoded_documents(out)
    assert sorted(train + valid) == sorted(documents)
    assert meta["dtype"] == dtype and meta["vocab_size"] == len(set(words)) + 2 + extra
    if dtype == "uint32":
        assert max(np.load(out / "train_ids.npy").max(), np.load(out / "valid_ids.npy").max()) < meta["vocab_size"]


def test_txt_separators_and_tail_split(tmp_path, capsys):
    docs = make_documents(3)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n<|endoftext|>\n".join(docs), encoding="utf-8")
    out = tmp_path / "data"
    code, err = run(capsys, corpus, "--doc_separator", "<|endoftext|>", "--vocab_size", 300, "--out", out)
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 3 and meta["split"] == "tail"
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    ids = np.concatenate([np.load(out / "train_ids.npy"), np.load(out / "valid_ids.npy")])
    assert [tok.decode(d) for d in split_docs(ids, meta["eos_token_id"])] == docs
    assert meta["valid_tokens"] >= 2 and meta["train_bytes"] + meta["valid_bytes"] == sum(len(d.encode()) for d in docs)

    blank = tmp_path / "b.txt"
    blank.write_text("first para\nline two\n\n\nsecond para\n\nthird\n", encoding="utf-8")
    assert run(capsys, blank, "--doc_separator", "blank", "--vocab_size", 300, "--out", tmp_path / "b")[0] == 0
    assert json.loads((tmp_path / "b" / "meta.json").read_text())["documents"] == 3


def test_a_txt_of_many_paragraphs_read_whole_says_so(tmp_path, capsys, monkeypatch):
    """Without --doc_separator a .txt is one document; thousands of blank-line paragraphs in it get a
    warning naming what was found and the flag that splits them (LF and CRLF, counted across reads)."""
    from tokenization import corpus as corpus_module

    monkeypatch.setattr(corpus_module, "FRAGMENT_BYTES", 5)  # blank lines straddle the blocks read
    paragraphs = [f"paragraph {i} of a long text" for i in range(1200)]
    text = "".join(p + ("\n\n" if i % 2 else "\r\n\r\n") for i, p in enumerate(paragraphs[:-1])) + paragraphs[-1]
    (tmp_path / "book.txt").write_bytes(text.encode())
    code, err = run(capsys, tmp_path / "book.txt", "--vocab_size", 300, "--out", tmp_path / "whole")
    assert code == 0 and json.loads((tmp_path / "whole" / "meta.json").read_text())["documents"] == 1
    assert (f"warning: {tmp_path / 'book.txt'} became one document (a .txt is read whole without --doc_separator) "
            "and holds 1,199 blank lines between paragraphs; if they separate documents, prepare again with "
            "--doc_separator blank") in err, err
    code, err = run(capsys, tmp_path / "book.txt", "--vocab_size", 300, "--out", tmp_path / "split",
                    "--doc_separator", "blank")
    assert code == 0 and "blank lines" not in err
    assert json.loads((tmp_path / "split" / "meta.json").read_text())["documents"] == 1200


def test_jsonl_parquet_json_and_directory_inputs(tmp_path, capsys, documents):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in documents[:40]), encoding="utf-8")
    pq.write_table(pa.table({"body": documents[40:80], "n": list(range(40))}), d / "sub" / "b.parquet")
    (d / "c.json").write_text(json.dumps([{"body": t} for t in documents[80:]]), encoding="utf-8")
    (d / ".hidden.txt").write_text("ignored", encoding="utf-8")
    out = tmp_path / "data"
    code, err = run(capsys, d, "--text_field", "body", "--vocab_size", 300, "--out", out)
    assert code == 0, err
    train, valid, meta = decoded_documents(out)
    assert sorted(train + valid) == sorted(documents)
    assert [s["name"].rsplit("/", 1)[-1] for s in meta["sources"]] == ["a.jsonl", "c.json", "b.parquet"]

    glob_out = tmp_path / "g"
    assert run(capsys, str(d / "**" / "*.parquet"), "--text_field", "body", "--vocab_size", 300,
               "--out", glob_out)[0] == 0
    assert json.loads((glob_out / "meta.json").read_text())["documents"] == 40


def test_existing_output_refused_then_overwritten(tmp_path, capsys, jsonl_corpus):
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run(capsys, jsonl_corpus, "--out", out, "--vocab_size", 300)
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "user data"
    assert run(capsys, jsonl_corpus, "--out", out, "--vocab_size", 300, "--overwrite")[0] == 0
    assert (out / "meta.json").exists() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "data"]


def _bad_inputs(tmp: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty.txt").write_text("  \n\n")
    (tmp / "bin.txt").write_bytes(b"\x00\x01\x02binary\x00" * 50)
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait ".encode("latin-1") * 20)
    (tmp / "tiny.txt").write_text("hi")
    (tmp / "nofield.jsonl").write_text('{"text": "ok"}\n{"content": "no text"}\n')
    no_eos = build_wordlevel_tokenizer(tmp / "noeos", ["a", "b"], eos=None)
    return {
        "missing": ([tmp / "nope.txt"], "no such file"),
        "empty": ([tmp / "empty.txt"], "empty"),
        "binary": ([tmp / "bin.txt"], "binary"),
        "non-utf8": ([tmp / "latin1.txt"], "--errors replace"),
        "too small": ([tmp / "tiny.txt", "--vocab_size", 300], "too small"),
        "unknown tokenizer": ([tmp / "tiny.txt", "--tokenizer", "no-such-org/no-such-tokenizer"], "cannot load tokenizer"),
        "no text field": ([tmp / "nofield.jsonl"], "'text'"),
        "no eos": ([tmp / "tiny.txt", "--tokenizer", no_eos], "neither an EOS nor a SEP"),
        "unknown dataset": (["no-such-org/no-such-dataset"], "loadable Hugging Face dataset"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "non-utf8", "too small", "unknown tokenizer",
                                  "no text field", "no eos", "unknown dataset"])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    args, expected = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run(capsys, *args, "--out", out)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_errors_replace_keeps_going(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait, ".encode("latin-1") * 40 + b"\n" + b"more text here " * 40)
    code, err = run(capsys, bad, "--errors", "replace", "--doc_separator", "line", "--vocab_size", 300,
                    "--out", tmp_path / "d")
    assert code == 0, err


def test_cli_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenization.prepare", str(tmp_path / "missing.txt")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.txt'}: no such file or directory"
