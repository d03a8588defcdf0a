"""CLI: documents -> token ids -> train_ids.npy, valid_ids.npy, meta.json, tokenizer/.

    python -m tokenization.prepare corpus.txt [more inputs] [--tokenizer gpt2] [--out data/]

A preparation reads, encodes, counts, splits and publishes (prepare() below, in that order); each
step lives in its own module. Memory stays bounded: documents stream in, ids stream out to a flat
file on disk, and the split copies ranges of that file into .npy files. Output appears atomically.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import PrepareError, __version__
from .corpus import ReadOptions, Source, iter_documents, resolve_sources, total_file_bytes
from .encode import MAX_PIECE_CHARS, Cutter, Encoder, encode_stream, pieces
from .fit import FitCounter, check_keeps_text, print_fit, tokenizer_fit
from .screen import DropSet, check_args, check_signed_inputs, screen, write_report, write_signatures
from .split import ValidPicker, refuse_existing, split_ids, staging
from .tokenizer import (TRAINED_BPE, id_dtype, keep_every_token, load_tokenizer, separator_id, tokenizer_fingerprint,
                        tokenizer_sha256)

SEPARATOR_WORDS = ("none", "blank", "line")
PARAGRAPHS_WARN = 1000  # blank lines in a .txt read as one document that suggest it holds many


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
    screening_args(p)
    args = p.parse_args(argv)
    if args.num_shards < 1 or not 0 <= args.shard_index < args.num_shards:
        raise PrepareError(f"--shard_index {args.shard_index} must be in [0, --num_shards {args.num_shards})")
    if args.num_shards > 1 and args.tokenizer is None and not args.signatures_only:  # signing encodes nothing
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
    check_args(args)
    return args


def screening_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("duplicates and benchmark contamination (docs/tokenize.md)")
    g.add_argument("--dedup", default="exact", help="drop duplicate documents before encoding, keeping the first: "
                   "exact (normalised text; the default), minhash (near duplicates) or none")
    g.add_argument("--dedup_threshold", type=float, default=None,
                   help="minhash: estimated Jaccard similarity of word n-grams that makes a duplicate (default 0.75)")
    g.add_argument("--dedup_ngram", type=int, default=None, help="minhash: words per n-gram (default 5)")
    g.add_argument("--dedup_report", type=Path, default=None,
                   help="write one JSON line per document left out (and the copy kept) to this file")
    g.add_argument("--signatures_only", action="store_true",
                   help="sharded dedup, step one: write this shard's signatures to --out, encode nothing")
    g.add_argument("--dedup_signatures", default=None,
                   help="sharded dedup, step two: the folder holding every shard's --signatures_only output")
    g.add_argument("--decontaminate", default=None,
                   help="lm-eval task names (as evaluate --tasks takes them): drop training documents that share "
                        "an n-gram with their evaluation documents")
    g.add_argument("--tasks_dir", default=None, help="folder of local lm-eval task YAMLs for --decontaminate")
    g.add_argument("--decontaminate_ngram", type=int, default=13, help="words per n-gram (default 13)")
    g.add_argument("--decontaminate_mode", default="drop", help="drop (default) or report: keep them, say so")

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
    """read -> screen -> encode -> count -> split -> publish, into a hidden folder renamed into place at the end."""
    out = Path(args.out)
    refuse_existing(out, args.overwrite)
    opts = ReadOptions(args.text_field, args.doc_separator, args.errors, args.dataset_config, args.split)
    all_sources = resolve_sources(args.inputs, opts)
    sources, doc_shard, shard_by = shard_plan(all_sources, args.shard_index, args.num_shards)
    os.environ["RAYON_NUM_THREADS"] = str(args.num_proc)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    with staging(out) as tmp:
        screening = screen(args, sources, all_sources, opts, doc_shard)
        if args.signatures_only:
            write_signatures(tmp, screening, args, sources, all_sources, opts)
            return out
        tok, tokenizer_name = tokenizer_for(args, sources, opts, tmp / "tokenizer", screening.drop)
        fingerprint = tokenizer_fingerprint(tok)  # before the clock starts, as meta.json's seconds always had it
        t0 = time.perf_counter()
        eos, dtype, picker = separator_id(tok), id_dtype(len(tok)), ValidPicker(args.val_fraction, args.seed)
        stats, fit, cutter = encode_corpus(tok, tmp, sources, opts, doc_shard, args.num_proc, eos, dtype, picker,
                                           screening.drop)
        check_signed_inputs(screening, sources)
        if stats["documents"] == 0 and doc_shard is not None:
            raise PrepareError(f"shard {args.shard_index} of {args.num_shards} got no document: the corpus has fewer "
                               "documents than shards (a .txt is one document unless --doc_separator splits it)")
        text_tokens = check_keeps_text(stats["tokens"] - stats["documents"], stats["bytes"])
        fit_stats = tokenizer_fit(fit.totals(), text_tokens, stats["bytes"])
        split = split_ids(tok, tmp, dtype, stats, picker, args.val_fraction)
        meta = describe(args, tok, tmp / "tokenizer", tokenizer_name, fingerprint, eos, dtype, stats, split, fit_stats)
        meta["document_cuts"] = {"forced": cutter.forced, "space_dropped": cutter.drop_space,
                                 "newline": cutter.newline}
        meta["sources"] = [s.info() for s in sources]
        meta.update(screening.meta)
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        if args.num_shards > 1:
            meta["shard"] = {"index": args.shard_index, "count": args.num_shards, "by": shard_by}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        report = write_report(args.dedup_report, screening.report(all_sources)) if args.dedup_report else None
    if report:
        report.replace(args.dedup_report)  # with the data, or not at all
    for src in sources:
        if src.documents == 1 and src.blank_lines >= PARAGRAPHS_WARN:
            print(f"warning: {src.name} became one document (a .txt is read whole without --doc_separator) and holds "
                  f"{src.blank_lines:,} blank lines between paragraphs; if they separate documents, prepare again "
                  "with --doc_separator blank", file=sys.stderr)
    if cutter.forced:
        print(f"warning: {cutter.forced} cut(s) inside text with no space or newline for {MAX_PIECE_CHARS:,} "
              "characters; ids near those cuts may differ from encoding the document whole", file=sys.stderr)
    return out


def tokenizer_for(args: argparse.Namespace, sources: list[Source], opts: ReadOptions, tok_dir: Path,
                  drop: DropSet) -> tuple[Any, str]:
    """The tokenizer named by --tokenizer, or a byte-level BPE trained on the corpus; saved to tok_dir,
    told to keep every token. Returns it with meta.json's name for it."""
    if args.tokenizer is None:
        from .bpe import train_bpe

        docs = (p for p in iter_documents(sources, opts) if p.doc not in drop)
        train_bpe((p.text for p in pieces(docs, Cutter())), args.vocab_size, tok_dir)
        tok, name = load_tokenizer(str(tok_dir)), f"{TRAINED_BPE} (vocab {args.vocab_size})"
    else:
        tok, name = load_tokenizer(args.tokenizer), args.tokenizer
        tok.save_pretrained(str(tok_dir))
    keep_every_token(tok)
    return tok, name


def encode_corpus(tok: Any, tmp: Path, sources: list[Source], opts: ReadOptions, doc_shard: tuple[int, int] | None,
                  num_proc: int, eos: int, dtype: np.dtype, picker: ValidPicker, drop: DropSet,
                  ) -> tuple[dict, FitCounter, Cutter]:
    """Every document of this shard but those dropped encoded into tmp/all.bin, with a progress bar over the input bytes;
    returns encode_stream's counts, the fit counter and the cutter (which counts its forced cuts)."""
    from tqdm.auto import tqdm

    encoder = Encoder(tok, tmp / "tokenizer", num_proc)
    try:
        cutter = Cutter(encoder.encode)
        fit = FitCounter(tok, len(tok), eos)
        bar = tqdm(total=total_file_bytes(sources), unit="B", unit_scale=True, desc="tokenize", disable=None)
        with open(tmp / "all.bin", "wb") as f:
            docs = (p for p in iter_documents(sources, opts, doc_shard) if p.doc not in drop)
            stats = encode_stream(pieces(docs, cutter), encoder, eos, dtype, f, picker, bar, fit)
        bar.close()
    finally:
        encoder.close()
    return stats, fit, cutter


def describe(args: argparse.Namespace, tok: Any, tok_dir: Path, tokenizer_name: str, fingerprint: str, eos: int,
             dtype: np.dtype, stats: dict, split: dict, fit_stats: dict) -> dict:
    """meta.json: the contract between this preparation and training (see DESIGN.md)."""
    return {
        "version": 1,
        "package_version": __version__,
        "tokenizer": tokenizer_name,
        "tokenizer_sha256": tokenizer_sha256(tok, tok_dir),
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": len(tok),
        "eos_token_id": eos,
        "dtype": dtype.name,
        "train_tokens": split["train_tokens"],
        "valid_tokens": split["valid_tokens"],
        "max_token_id": split["max_token_id"],
        "train_bytes": stats["bytes"] - split["valid_bytes"],
        "valid_bytes": split["valid_bytes"],
        "bytes_per_token": fit_stats["bytes_per_token"],
        "documents": stats["documents"],
        "train_documents": stats["documents"] - split["valid_documents"],
        "valid_documents": split["valid_documents"],
        "split": split["split"],
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "tokenizer_fit": fit_stats,
    }


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


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
    if "signatures" in meta:
        sig = meta["signatures"]
        print(f"wrote {out}/: {sig['method']} signatures of {plural(sig['documents'], 'document')} (shard "
              f"{sig['shard_index']} of {sig['shard_count']}); next: prepare each shard with --dedup_signatures")
        return 0
    print(
        f"wrote {out}/: {meta['train_tokens']:,} train + {meta['valid_tokens']:,} valid tokens "
        f"({meta['dtype']}, vocab {meta['vocab_size']:,}, {plural(meta['documents'], 'document')}, "
        f"split by {meta['split']}, {meta['bytes_per_token']:.2f} bytes per token)"
    )
    for line in screening_lines(meta):
        print(line)
    print_fit(meta["tokenizer_fit"], trained=args.tokenizer is None)
    return 0


def screening_lines(meta: dict) -> list[str]:
    """What dedup and decontamination did, a line each."""
    lines = []
    if "dedup" in meta:
        d = meta["dedup"]
        lines.append(f"dedup {d['method']}: dropped {d['documents_dropped']:,} of {d['documents_in']:,} documents "
                     f"({d['bytes_dropped'] / 1e6:,.1f} MB) in {d['seconds']:.1f} s")
    for task, c in meta.get("contamination", {}).items():
        action = "dropped" if c["mode"] == "drop" else "kept (report mode)"
        short = c.get("eval_documents_too_short", 0)
        unchecked = f" ({short:,} too short to check)" if short else ""
        lines.append(f"contamination {task}: {c['train_documents_hit']:,} training documents share a {c['ngram']}-gram "
                     f"with {c['eval_documents_hit']:,} of its {c['eval_documents']:,} documents{unchecked}; {action}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
