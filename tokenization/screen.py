"""What a preparation leaves out before encoding: duplicate documents (dedup.py) and documents that
contain benchmark text (contamination.py), found in one pass over the corpus that reads and
normalises, but does not encode. The result is a set of document ids to skip, meta.json's `dedup` and
`contamination`, and the rows of --dedup_report.

Sharded, duplicates are found in two steps: every shard signs its documents (--signatures_only),
then every shard reads all signatures (--dedup_signatures) and drops its documents that have an
earlier copy anywhere in the corpus: the same documents an unsharded preparation drops."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import PrepareError
from .contamination import Checker, build_index
from .corpus import ReadOptions, Source, iter_documents, total_file_bytes
from .dedup import SIGNATURES, DedupSettings, Signatures, Signer, plan, shard_signatures

MODES = ("drop", "report")


@dataclass
class Screening:
    drop: "DropSet" = field(default_factory=lambda: DropSet())
    meta: dict = field(default_factory=dict)
    contaminated: list[dict] = field(default_factory=list)  # report rows
    duplicates: tuple | None = None  # (signatures, kept, dropped) for the report rows
    signatures: Signatures | None = None

    def report(self, sources: list[Source]) -> Iterator[dict]:
        if self.duplicates:
            yield from duplicate_rows(sources, *self.duplicates)
        yield from self.contaminated


def settings_of(args: argparse.Namespace) -> DedupSettings:
    return DedupSettings(args.dedup, args.dedup_threshold, args.dedup_ngram)


def check_args(args: argparse.Namespace) -> None:
    """One-line refusals for screening options that cannot work together."""
    settings_of(args)
    if args.decontaminate_mode not in MODES:
        raise PrepareError(f"--decontaminate_mode {args.decontaminate_mode!r}: choose drop or report")
    if args.decontaminate_ngram < 1:
        raise PrepareError(f"--decontaminate_ngram {args.decontaminate_ngram} must be at least 1")
    if args.signatures_only and args.dedup == "none":
        raise PrepareError("--signatures_only signs documents for --dedup exact or minhash; name one")
    sharded_dedup = args.num_shards > 1 and args.dedup != "none"
    if sharded_dedup and not (args.signatures_only or args.dedup_signatures):
        raise PrepareError("--dedup across shards needs every shard's signatures: first run each shard with "
                           "--signatures_only --out SIGS/shard_I, then prepare each with --dedup_signatures SIGS "
                           "(or --dedup none); see docs/tokenize.md")
    if args.dedup_signatures and not Path(args.dedup_signatures).is_dir():
        raise PrepareError(f"--dedup_signatures {args.dedup_signatures} is not a directory")


def doc_name(sources: list[Source], doc: tuple[int, int]) -> dict:
    return {"source": sources[int(doc[0])].name, "document": int(doc[1])}


def screen(args: argparse.Namespace, sources: list[Source], all_sources: list[Source], opts: ReadOptions,
           doc_shard: tuple[int, int] | None) -> Screening:
    """The documents this preparation (or shard) leaves out, with what meta.json and the report say."""
    settings = settings_of(args)
    out = Screening()
    sign = settings.method != "none" and not args.dedup_signatures
    checker = None
    if args.decontaminate and not args.signatures_only:
        names = [n.strip() for n in args.decontaminate.split(",") if n.strip()]
        checker = Checker(build_index(names, args.tasks_dir, args.decontaminate_ngram))
    seconds = 0.0
    if sign or checker:
        t0 = time.perf_counter()
        signer = Signer(settings) if sign else None
        _read(sources, opts, doc_shard, signer, checker)
        seconds = round(time.perf_counter() - t0, 3)
        out.signatures = signer.signatures() if signer else None
    if settings.method != "none" and not args.signatures_only:
        whole = out.signatures if sign else shard_signatures(Path(args.dedup_signatures), settings, args.num_shards,
                                                             [s.name for s in all_sources])
        _dedup(out, whole, settings, _mine(whole, sources, doc_shard), all_sources)
        out.meta["dedup"]["seconds"] = seconds
    if checker:
        _contamination(out, checker, args.decontaminate_mode, all_sources)
        out.meta["contamination_seconds"] = seconds
    return out


def _read(sources: list[Source], opts: ReadOptions, doc_shard: tuple[int, int] | None, signer: Signer | None,
          checker: Checker | None) -> None:
    from tqdm.auto import tqdm

    bar = tqdm(total=total_file_bytes(sources), unit="B", unit_scale=True, desc="screen", disable=None)
    for part in iter_documents(sources, opts, doc_shard):
        if signer:
            signer.add(part)
        if checker:
            checker.add(part.text, part.last, part.doc)
        bar.update(len(part.text))
    bar.close()


def _mine(sig: Signatures, sources: list[Source], doc_shard: tuple[int, int] | None) -> np.ndarray:
    """Which of the corpus's documents this shard prepares (a shard reads some files, or every
    count-th document of the stream)."""
    if doc_shard is not None:
        return np.arange(len(sig.ids)) % doc_shard[1] == doc_shard[0]
    return np.isin(sig.ids[:, 0], [s.ordinal for s in sources])


class DropSet:
    """Document ids to leave out, as one flag per document of each source (a set of tuples would
    cost a hundred bytes per document on a corpus of millions)."""

    def __init__(self) -> None:
        self.flags: dict[int, np.ndarray] = {}

    def add_many(self, ids: np.ndarray) -> None:
        for source in np.unique(ids[:, 0]) if len(ids) else []:
            index = ids[ids[:, 0] == source, 1]
            old = self.flags.get(int(source), np.zeros(0, bool))
            flags = np.zeros(max(len(old), int(index.max()) + 1), bool)
            flags[:len(old)] = old
            flags[index] = True
            self.flags[int(source)] = flags

    def __contains__(self, doc: tuple[int, int]) -> bool:
        flags = self.flags.get(doc[0])
        return flags is not None and doc[1] < len(flags) and bool(flags[doc[1]])


def _dedup(out: Screening, sig: Signatures, settings: DedupSettings, mine: np.ndarray,
           sources: list[Source]) -> None:
    found = plan(sig, settings)
    dropped = found.dropped[mine[found.dropped]]  # this shard's
    out.drop.add_many(sig.ids[dropped])
    out.meta["dedup"] = {**found.stats, "documents_in": int(mine.sum()), "documents_dropped": len(dropped),
                         "bytes_dropped": int(sig.sizes[dropped].sum())}
    out.duplicates = (sig, found.kept, dropped)


def duplicate_rows(sources: list[Source], sig: Signatures, kept: np.ndarray, dropped: np.ndarray) -> Iterator[dict]:
    for i in dropped:
        k = kept[i]
        yield {"reason": "duplicate", "dropped": doc_name(sources, tuple(sig.ids[i])),
               "kept": doc_name(sources, tuple(sig.ids[k])),
               "similarity": round(float((sig.keys[i] == sig.keys[k]).mean()), 4)}


def _contamination(out: Screening, checker: Checker, mode: str, sources: list[Source]) -> None:
    stats = checker.stats(mode)
    out.meta["contamination"] = stats
    names = checker.index.names
    for doc, found in sorted(checker.hits.items()):
        tasks: dict[str, list[int]] = {}
        for t, e in sorted(found):
            tasks.setdefault(names[t], []).append(e)
        out.contaminated.append({"reason": "contamination", "document": doc_name(sources, doc), "tasks": tasks,
                                 "dropped": mode == "drop"})
        if mode == "drop":
            out.drop.add_many(np.array([doc]))


def write_signatures(tmp: Path, screening: Screening, args: argparse.Namespace, sources: list[Source]) -> None:
    """Step one of a sharded dedup: this shard's signatures and what they were made with."""
    settings = settings_of(args)
    screening.signatures.save(tmp / SIGNATURES)
    meta = {"signatures": {"method": settings.method, "settings": settings.info(), "shard_index": args.shard_index,
                           "shard_count": args.num_shards, "documents": len(screening.signatures.ids)},
            "sources": [s.info() for s in sources]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def write_report(path: Path, rows: Iterator[dict]) -> None:
    """--dedup_report: one JSON line per document left out (or found and kept), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tmp.replace(path)
