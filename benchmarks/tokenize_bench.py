"""Tokenization throughput and memory: `tokenization.prepare` end to end against the same tokenizer's
raw batch encode of the same documents with all cores, measured in the same run.

    python benchmarks/tokenize_bench.py [--tokenizer DIR] [--mb 24] [--repeats 3] [--rss_mb 1000]

Prints each median, the ratio (target >= 0.85), and the peak RSS of a prepare run on an
`--rss_mb` corpus (target < 1.5 GB at 1000 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
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


def write_corpus(path: Path, mb: float, paras: list[str], seed: int = 0) -> int:
    """A jsonl corpus of about `mb` megabytes: documents of 1 to 20 shuffled paragraphs."""
    rng = random.Random(seed)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < mb * 1e6:
            doc = "\n\n".join(rng.choice(paras) for _ in range(rng.randint(1, 20)))
            f.write(json.dumps({"text": doc}) + "\n")
            size += len(doc.encode("utf-8"))
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2"))
    p.add_argument("--mb", type=float, default=24.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rss_mb", type=float, default=0.0, help="also measure peak RSS on a corpus this large")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="tokbench-"))
    corpus = tmp / "corpus.jsonl"
    nbytes = write_corpus(corpus, args.mb, paragraphs())
    docs = [json.loads(line)["text"] for line in corpus.open(encoding="utf-8")]
    backend = AutoTokenizer.from_pretrained(args.tokenizer).backend_tokenizer

    def raw() -> None:
        [e.ids for e in backend.encode_batch_fast(docs, add_special_tokens=False)]

    def prepare() -> None:
        subprocess.run([sys.executable, "-m", "tokenization.prepare", str(corpus), "--tokenizer", args.tokenizer,
                        "--out", str(tmp / "data"), "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)

    def prepare_seconds() -> float:
        prepare()
        return json.loads((tmp / "data" / "meta.json").read_text())["seconds"]

    raw_s = median_time(raw, args.repeats)
    import statistics

    e2e_s = statistics.median(prepare_seconds() for _ in range(args.repeats))
    print(f"machine: {machine()}")
    print(f"corpus: {nbytes / 1e6:.1f} MB, {len(docs)} documents; tokenizer: {args.tokenizer}")
    print(f"raw batch encode (all cores):   {nbytes / raw_s / 1e6:6.2f} MB/s  (median of {args.repeats})")
    print(f"tokenization.prepare end to end: {nbytes / e2e_s / 1e6:6.2f} MB/s  (median of {args.repeats}; read, encode, split, write)")
    print(f"ratio: {raw_s / e2e_s:.3f}  (target >= 0.85)")
    if args.rss_mb:
        big = tmp / "big.jsonl"
        size = write_corpus(big, args.rss_mb, paragraphs(), seed=1)
        del docs
        subprocess.run([sys.executable, "-m", "tokenization.prepare", str(big), "--tokenizer", args.tokenizer,
                        "--out", str(tmp / "big"), "--overwrite"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(f"peak RSS of prepare on {size / 1e9:.2f} GB: {peak / 1e9:.2f} GB  (target < 1.5 GB)")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
