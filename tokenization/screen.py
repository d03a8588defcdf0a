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
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from . import PrepareError
from .contamination import Checker, build_index
from .corpus import ReadOptions, Source, iter_documents, total_file_bytes
from .dedup import SIGNATURES, DedupSettings, Signatures, Signer, plan, shard_signatures, similarity
from .tasks import task_list

MODES = ("drop", "report")


@dataclass
class Screening:
    drop: "DropSet" = field(default_factory=lambda: DropSet())
    meta: dict = field(default_factory=dict)
    contaminated: list[dict] = field(default_factory=list)  # report rows
    duplicates: tuple | None = None  # (dropped ids, kept ids, similarities) for the report rows
    signatures: Signatures | None = None  # --signatures_only: what step one writes (else freed once used)
    signed_sha256: dict[str, str] = field(default_factory=dict)  # --dedup_signatures: each input as step one read it

    def report(self, sources: list[Source]) -> Iterator[dict]:
        if self.duplicates:
            yield from duplicate_rows(sources, *self.duplicates)
        yield from self.contaminated


def settings_of(args: argparse.Namespace) -> DedupSettings:
    defaults = DedupSettings()
    return DedupSettings(args.dedup, defaults.threshold if args.dedup_threshold is None else args.dedup_threshold,
                         defaults.ngram if args.dedup_ngram is None else args.dedup_ngram)


def check_args(args: argparse.Namespace) -> None:
    """One-line refusals for screening options that cannot work together, or would be ignored."""
    settings_of(args)
    if args.decontaminate_mode not in MODES:
        raise PrepareError(f"--decontaminate_mode {args.decontaminate_mode!r}: choose drop or report")
    if args.decontaminate_ngram < 1:
        raise PrepareError(f"--decontaminate_ngram {args.decontaminate_ngram} must be at least 1")
    if args.decontaminate is not None and not task_list(args.decontaminate):
        raise PrepareError(f"--decontaminate {args.decontaminate!r} names no task (lm-eval names, comma-separated)")
    if args.dedup != "minhash" and (args.dedup_threshold is not None or args.dedup_ngram is not None):
        raise PrepareError("--dedup_threshold and --dedup_ngram set near-duplicate detection: add --dedup minhash")
    if args.dedup == "none" and (args.signatures_only or args.dedup_signatures):
        raise PrepareError("--signatures_only and --dedup_signatures are the two steps of a sharded dedup: "
                           "name --dedup exact or minhash")
    if args.signatures_only and args.dedup_signatures:
        raise PrepareError("--signatures_only is step one and --dedup_signatures step two of a sharded dedup: "
                           "run them one after the other")
    check_report(args)
    sharded_dedup = args.num_shards > 1 and args.dedup != "none"
    if sharded_dedup and not (args.signatures_only or args.dedup_signatures):
        raise PrepareError("--dedup across shards needs every shard's signatures: first run each shard with "
                           "--signatures_only --out SIGS/shard_I, then prepare each with --dedup_signatures SIGS "
                           "(or --dedup none); see docs/tokenize.md")
    if args.dedup_signatures and not Path(args.dedup_signatures).is_dir():
        raise PrepareError(f"--dedup_signatures {args.dedup_signatures} is not a directory")


def check_report(args: argparse.Namespace) -> None:
    """--dedup_report is checked before any work: a report nobody could write, or one that would
    replace an earlier one, is refused while nothing has been done."""
    path = args.dedup_report
    if path is None:
        return
    if args.signatures_only:
        raise PrepareError("--dedup_report is written by step two (--dedup_signatures), not by --signatures_only")
    if args.dedup == "none" and not args.decontaminate:
        raise PrepareError("--dedup_report lists what --dedup or --decontaminate leave out; with --dedup none and "
                           "no --decontaminate there is nothing to report")
    if path.is_dir():
        raise PrepareError(f"--dedup_report {path} is a directory; name a file")
    if path.exists() and not args.overwrite:
        raise PrepareError(f"--dedup_report {path} exists; pass --overwrite to replace it, or name another file")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise PrepareError(f"--dedup_report {path} cannot be written (no writable folder above it)")


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
        checker = Checker(build_index(task_list(args.decontaminate), args.tasks_dir, args.decontaminate_ngram))
    seconds, signed = 0.0, None
    if sign or checker:
        t0 = time.perf_counter()
        signer = Signer(settings) if sign else None
        _read(sources, opts, doc_shard, signer, checker)
        seconds = round(time.perf_counter() - t0, 3)
        signed = signer.signatures() if signer else None
    if args.signatures_only:
        out.signatures = signed  # step one writes them; nothing is dropped yet
    elif settings.method != "none":
        if signed is None:  # step two: every shard's, signed before
            signed, out.signed_sha256 = shard_signatures(Path(args.dedup_signatures), settings, args.num_shards,
                                                         inputs_of(all_sources, opts))
        _dedup(out, signed, settings, _mine(signed, sources, doc_shard), bool(args.dedup_report))
        del signed  # freed once the plan is made: not held while encoding
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


def _dedup(out: Screening, sig: Signatures, settings: DedupSettings, mine: np.ndarray, report: bool) -> None:
    found = plan(sig, settings)
    dropped = found.dropped[mine[found.dropped]]  # this shard's
    out.drop.add_many(sig.ids[dropped])
    out.meta["dedup"] = {**found.stats, "documents_in": int(mine.sum()), "documents_dropped": len(dropped),
                         "bytes_dropped": int(sig.sizes[dropped].sum())}
    if report:  # the rows' ids and similarities only: the signatures themselves are not kept
        kept = found.kept[dropped]
        out.duplicates = (sig.ids[dropped], sig.ids[kept], similarity(sig.keys, dropped, kept))


def duplicate_rows(sources: list[Source], dropped: np.ndarray, kept: np.ndarray,
                   similarities: np.ndarray) -> Iterator[dict]:
    for d, k, sim in zip(dropped, kept, similarities):
        yield {"reason": "duplicate", "dropped": doc_name(sources, tuple(d)), "kept": doc_name(sources, tuple(k)),
               "similarity": round(float(sim), 4)}


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
    if mode == "drop" and checker.hits:
        out.drop.add_many(np.array(sorted(checker.hits)))  # at once: one flag array per source


def inputs_of(sources: list[Source], opts: ReadOptions) -> dict:
    """What numbers the documents: the inputs in order, their sizes, and how they are read. Step two
    must see the same, or its document ids would name other documents."""
    return {"inputs": [{"name": s.name, "size_bytes": s.size_bytes} for s in sources], "read": asdict(opts)}


def write_signatures(tmp: Path, screening: Screening, args: argparse.Namespace, sources: list[Source],
                     all_sources: list[Source], opts: ReadOptions) -> None:
    """Step one of a sharded dedup: this shard's signatures and what they were made with."""
    settings = settings_of(args)
    screening.signatures.save(tmp / SIGNATURES)
    meta = {"signatures": {"method": settings.method, "settings": settings.info(), "shard_index": args.shard_index,
                           "shard_count": args.num_shards, "documents": len(screening.signatures.ids),
                           **inputs_of(all_sources, opts)},
            "sources": [s.info() for s in sources]}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def check_signed_inputs(screening: Screening, sources: list[Source]) -> None:
    """After encoding: every input read now is the file step one signed (a file edited in between
    would have its documents dropped by another file's signatures)."""
    for src in sources:
        signed = screening.signed_sha256.get(src.name)
        if signed and src.sha256 and signed != src.sha256:
            raise PrepareError(f"{src.name} changed since its signatures were made (sha256 {signed[:12]}... then, "
                               f"{src.sha256[:12]}... now); run --signatures_only for every shard again")


def write_report(path: Path, rows: Iterator[dict]) -> Path:
    """--dedup_report: one JSON line per document left out (or found and kept), into a hidden file
    beside it that the caller renames into place with the data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return tmp
