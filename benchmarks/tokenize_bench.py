"""Tokenization throughput and memory: `tokenization.prepare` end to end against the same tokenizer's
raw batch encode of the same text with all cores, measured in the same run, on two shapes of
corpus: many documents (jsonl) and one document (a plain .txt, as nanoGPT's input.txt).

    python benchmarks/tokenize_bench.py [--tokenizer DIR] [--mb 24] [--repeats 3] [--rss_mb 1000]

Prints each median, the ratio (target >= 0.85), and the peak RSS of a prepare run on an
`--rss_mb` corpus of each shape (target < 1.5 GB at 1000 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median_time  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def paragraphs() -> list[str]:
    """Real prose: the shared Austen corpus when present, else the stdlib docstring corpus."""
    austen = SHARED / "corpora" / "austen.txt"
    if austen.exists():
        text = austen.read_text(encoding="utf-8")
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    sys.path.insert(0, str(ROOT))
    import sysconfig

    from tokenization.sample_corpus import module_documents

    return list(module_documents(Path(sysconfig.get_paths()["stdlib"])))


def write_corpus(path: Path, mb: float, paras: list[str], seed: int = 0) -> list[str]:
    """A corpus of about `mb` megabytes: documents of 1 to 20 shuffled paragraphs, one JSON line each
    (.jsonl), or all of them one after another as a single document (.txt). Returns the documents
    when they are small enough to keep."""
    rng = random.Random(seed)
    size, docs = 0, []
    one_doc = path.suffix == ".txt"
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 20)))
            f.write(doc + "\n\n" if one_doc else json.dumps({"text": doc}) + "\n")
            size += len(doc.encode("utf-8"))
            if mb <= 100:
                docs.append(doc)
    return docs


def prepare(corpus: Path, out: Path, tokenizer: str) -> dict:
    subprocess.run([sys.executable, "-m", "tokenization.prepare", str(corpus), "--tokenizer", tokenizer,
                    "--out", str(out), "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "meta.json").read_text())


def peak_rss_of_prepare(corpus: Path, out: Path, tokenizer: str) -> float:
    """Peak RSS (bytes) of one prepare process, read by /usr/bin/time's wait4 through a shell-free child."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    res = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "tokenization.prepare", str(corpus),
                          "--tokenizer", tokenizer, "--out", str(out), "--overwrite"],
                         check=True, cwd=ROOT, capture_output=True, text=True)
    return int(res.stdout.strip()) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    p.add_argument("--mb", type=float, default=24.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss_mb", type=float, default=0.0, help="also measure peak RSS on corpora this large")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import shutil
    import statistics

    from transformers import AutoTokenizer

    backend = AutoTokenizer.from_pretrained(args.tokenizer).backend_tokenizer
    tmp = Path(tempfile.mkdtemp(prefix="tokbench-"))
    print(f"machine: {machine()}; tokenizer: {args.tokenizer}")
    paras = paragraphs()
    for shape, name in (("many documents", "corpus.jsonl"), ("one document", "corpus.txt")):
        corpus = tmp / name
        docs = write_corpus(corpus, args.mb, paras)
        nbytes = corpus.stat().st_size
        # The raw rate: the same text in encode_batch calls of whole documents, or of 64k-character
        # slices of the one document (what a tokenizer can do at best, whatever prepare does).
        texts = docs if shape == "many documents" else [t[i:i + (1 << 16)] for t in [corpus.read_text(encoding="utf-8")]
                                                          for i in range(0, len(t), 1 << 16)]

        def raw() -> None:
            [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

        raw_s = median_time(raw, args.repeats)
        e2e_s = statistics.median(prepare(corpus, tmp / "data", args.tokenizer)["seconds"] for _ in range(args.repeats))
        print(f"[{shape}] corpus {nbytes / 1e6:.1f} MB, {len(docs)} documents")
        print(f"  raw batch encode (all cores):    {nbytes / raw_s / 1e6:6.2f} MB/s  (median of {args.repeats})")
        print(f"  tokenization.prepare end to end: {nbytes / e2e_s / 1e6:6.2f} MB/s  (median of {args.repeats}; "
              "read, encode, split, write)")
        print(f"  ratio: {raw_s / e2e_s:.3f}  (target >= 0.85)")
        if args.rss_mb:
            big = tmp / f"big{corpus.suffix}"
            write_corpus(big, args.rss_mb, paras, seed=1)
            peak = peak_rss_of_prepare(big, tmp / "big", args.tokenizer)
            print(f"  peak RSS of prepare on {big.stat().st_size / 1e9:.2f} GB: {peak / 1e9:.2f} GB  (target < 1.5 GB)")
            big.unlink()
            shutil.rmtree(tmp / "big", ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
