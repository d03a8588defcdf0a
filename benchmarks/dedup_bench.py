"""What finding duplicates costs in `prepare`: the same preparation with --dedup none (the baseline),
exact and minhash, run in turn --repeats times in this process; prints the median seconds of each,
its ratio to the baseline, and the documents dropped. --sign_only GB instead signs and plans a corpus
of that size (the corpus repeated) in a child process and prints the peak RSS of that child: the
memory dedup adds, which grows with the number of documents, not their bytes.

    python benchmarks/dedup_bench.py CORPUS [--tokenizer DIR] [--doc_separator blank] [--repeats 3]
    python benchmarks/dedup_bench.py CORPUS --doc_separator blank --sign_only 1.0 --method minhash"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare_seconds(corpus: str, args: argparse.Namespace, method: str, out: Path) -> tuple[float, dict]:
    from tokenization.prepare import main

    argv = [corpus, "--out", str(out), "--overwrite", "--dedup", method, "--doc_separator", args.doc_separator]
    argv += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    return time.perf_counter() - t0, json.loads((out / "meta.json").read_text()).get("dedup", {})


def sign_child(corpus: str, gigabytes: float, method: str, separator: str) -> None:
    """In the child: sign `gigabytes` of the corpus repeated (each copy a new source), plan, print JSON."""
    from tokenization.corpus import ReadOptions, iter_documents, resolve_sources
    from tokenization.dedup import DedupSettings, plan, sign

    copies = max(1, round(gigabytes * 1e9 / Path(corpus).stat().st_size))
    opts = ReadOptions(doc_separator=separator)
    sources = resolve_sources([corpus] * copies, opts)
    settings = DedupSettings(method)
    t0 = time.perf_counter()
    found = plan(sign(iter_documents(sources, opts), settings), settings)
    print(json.dumps({**found.stats, "seconds": round(time.perf_counter() - t0, 1), "gigabytes": round(
        copies * Path(corpus).stat().st_size / 1e9, 2), "peak_rss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss // 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus")
    p.add_argument("--tokenizer", default=None, help="default: a byte-level BPE trained on the corpus")
    p.add_argument("--doc_separator", default="blank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sign_only", type=float, default=None, metavar="GB")
    p.add_argument("--method", default="minhash", help="with --sign_only: exact or minhash")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return sign_child(args.corpus, args.sign_only, args.method, args.doc_separator)
    if args.sign_only is not None:
        out = subprocess.run([sys.executable, __file__, args.corpus, "--child", "--sign_only", str(args.sign_only),
                              "--method", args.method, "--doc_separator", args.doc_separator],
                             capture_output=True, text=True, check=True).stdout
        return print(out.strip())
    times: dict[str, list[float]] = {"none": [], "exact": [], "minhash": []}
    dropped = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for method in times:  # interleaved, so that a slow moment of the machine hits all three
                seconds, dedup = prepare_seconds(args.corpus, args, method, Path(tmp) / method)
                times[method].append(seconds)
                dropped[method] = dedup.get("documents_dropped", 0)
    base = statistics.median(times["none"])
    for method, ts in times.items():
        med = statistics.median(ts)
        print(f"--dedup {method:<8} {med:7.2f} s  x{med / base:.3f} of --dedup none  dropped {dropped[method]:,}")


if __name__ == "__main__":
    main()
