"""benchmarks/time_to_loss.py on data that is not the repo's: a prepared folder (--data), a corpus
of one's own (--corpus, --prepare_args), extra flags for every run, and the one-line refusals."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import build_wordlevel_tokenizer, make_documents
from tests.helpers import ROOT

SMALL = ["--preset", "tiny", "--block_size", "32", "--micro_batch_size", "4", "--tokens", "3072", "--evals", "4",
         "--eval_iters", "2", "--seeds", "1", "--precision", "no"]


def time_to_loss(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "time_to_loss.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_prepared_data_and_extra_flags(tmp_path, data_dir):
    work = tmp_path / "work"
    out = time_to_loss(*SMALL, "--data", data_dir, "--variants", "adamw-cosine", "muon-wsd", "--work", work,
                       "--plot", tmp_path / "curves.png", "--train_args", "--weight_decay 0.05 --min_lr 1e-4")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"data: {data_dir} (" in out.stdout and "vocabulary 512" in out.stdout
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith(("adamw-cosine", "muon-wsd"))}
    assert set(rows) == {"adamw-cosine", "muon-wsd"}
    assert re.search(r"adamw-cosine\s+\d\.\d{4}\s+[\d,]+\s+1\.000 \(1\.000-1\.000\)", rows["adamw-cosine"])
    assert (tmp_path / "curves.png").stat().st_size > 0
    for variant in ("adamw-cosine", "muon-wsd"):  # the extra flags reached every run, after the variant's own
        config = json.loads((work / f"{variant}-s1" / "config.json").read_text())
        assert config["weight_decay"] == 0.05 and config["min_lr"] == 1e-4, config
    assert config["optimizer"] == "muon" and config["lr_schedule"] == "wsd"


def test_own_corpus_and_tokenizer_then_another_corpus_is_refused(tmp_path, documents):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\r\n\r\n".join(make_documents(300, seed=5)), encoding="utf-8")  # CRLF, blank-line documents
    words = " ".join(make_documents(300, seed=5) + documents).replace(".", " ").replace(":", " ").split()
    tok = build_wordlevel_tokenizer(tmp_path / "tok", words)
    work = tmp_path / "work"
    prepare = f"--tokenizer {tok.name} --doc_separator blank"
    out = time_to_loss(*SMALL, "--corpus", corpus.name, "--prepare_args", prepare, "--variants", "adamw-cosine",
                       "--work", work.name, cwd=tmp_path)  # paths relative to the caller's folder
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "time_to_loss.png").stat().st_size > 0
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert meta["documents"] == 300 and meta["vocab_size"] == len(set(words)) + 2, meta
    assert re.search(r"^adamw-cosine\s+\d\.\d{4}", out.stdout, re.M)

    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(make_documents(50, seed=9)), encoding="utf-8")
    again = time_to_loss(*SMALL, "--corpus", other, "--variants", "adamw-cosine", "--work", work)
    assert again.returncode != 0 and "holds data and runs of another corpus" in again.stderr
    assert again.stderr.count("\n") == 1 and "Traceback" not in again.stderr


def test_refusals_are_one_line(tmp_path):
    no_meta = time_to_loss(*SMALL, "--data", tmp_path, "--work", tmp_path / "w")
    assert no_meta.returncode != 0 and no_meta.stderr.strip().endswith("make it with python -m tokenization.prepare")
    assert "Traceback" not in no_meta.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text(json.dumps({"vocab_size": 64}))
    failed = time_to_loss(*SMALL, "--data", bad, "--variants", "adamw-cosine", "--work", tmp_path / "w2")
    assert failed.returncode != 0 and "run adamw-cosine-s1 failed" in failed.stderr, failed.stderr
    assert Path(failed.stderr.strip().rsplit(" ", 1)[-1]).is_file() and "Traceback" not in failed.stderr
