"""CLI: join shard directories (or any data directories of one tokenizer) into one data directory
without copying a token: its meta.json lists the shards, and training reads their ids in place.

    python -m tokenization.merge data/shard_0 data/shard_1 ... --out data/all

Shards made by `prepare --num_shards N --shard_index I` are ordered by I and must all be present.
The tokenizer of every shard must be the same (meta.json's tokenizer_fingerprint where every shard has
one, and tokenizer_sha256)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from . import PrepareError, __version__
from .fit import print_fit, tokenizer_fit
from .split import refuse_existing, staging
from .tokenizer import TRAINED_BPE

SUMMED = ("train_tokens", "valid_tokens", "train_bytes", "valid_bytes", "documents", "train_documents",
          "valid_documents")
SAME = ("vocab_size", "eos_token_id", "dtype", "tokenizer_sha256")
FINGERPRINT = "tokenizer_fingerprint"  # shards of an older version have none: tokenizer_sha256 decides then
FIT_COUNTS = ("whitespace_only_tokens", "single_space_tokens", "unk_tokens")
SPLITS = ("train", "valid")


def read_meta(d: Path) -> dict:
    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PrepareError(f"{d} is not a prepared data directory ({e}); pass the --out folders of prepare") from None
    if "shards" in meta:
        raise PrepareError(f"{d} is itself a merged directory; merge its shards instead")
    if not meta.get("tokenizer_sha256"):
        raise PrepareError(f"{d}/meta.json has no tokenizer_sha256 (made by an older version); prepare it again")
    return meta


def largest_ids(metas: list[dict]) -> dict[str, int | None]:
    """meta.json's max_token_id of the merged directory: per split, the largest over the shards
    (None where every shard's split is empty)."""
    return {split: max((m["max_token_id"][split] for m in metas if m["max_token_id"][split] is not None),
                       default=None) for split in SPLITS}


def screening_totals(metas: list[dict]) -> dict:
    """The shards' dedup and contamination as one corpus's: counts summed, evaluation documents joined.
    Dedup found duplicates across the inputs only when they are the shards of one sharded dedup
    (`across_inputs`); a task counts only if every input was checked for it, and is `report` if any
    input kept what it found."""
    out: dict = {}
    if all("dedup" in m for m in metas):
        d = [m["dedup"] for m in metas]
        shards = {(m.get("shard") or {}).get("count") for m in metas}
        out["dedup"] = {"method": d[0]["method"], "settings": d[0]["settings"],
                        **{k: sum(x[k] for x in d) for k in ("documents_in", "documents_dropped", "bytes_dropped")},
                        "across_inputs": len(metas) == 1 or shards == {len(metas)}}
    if all("contamination" in m for m in metas):
        out["contamination"] = {}
        for task in [t for t in metas[0]["contamination"] if all(t in m["contamination"] for m in metas)]:
            per = [m["contamination"][task] for m in metas]
            hits = sorted({e for p in per for e in p.get("eval_hits", [])})
            mode = "report" if any(p.get("mode") == "report" for p in per) else per[0].get("mode")
            out["contamination"][task] = {**per[0], "eval_documents_hit": len(hits), "eval_hits": hits, "mode": mode,
                                          "train_documents_hit": sum(p.get("train_documents_hit", 0) for p in per)}
    return out


def merge(dirs: list[Path], out: Path, overwrite: bool = False) -> Path:
    refuse_existing(out, overwrite)
    metas = [(d, read_meta(d)) for d in dirs]
    shards = [m.get("shard") for _, m in metas]
    if any(shards):
        counts = {s["count"] for s in shards if s}
        indices = sorted(s["index"] for s in shards if s)
        if not all(shards) or len(counts) != 1 or indices != list(range(counts.pop())):
            raise PrepareError(f"shards {indices} given; every shard of one `prepare --num_shards N` run is needed, "
                               "each once")
        metas.sort(key=lambda dm: dm[1]["shard"]["index"])
    first = metas[0][1]
    for d, m in metas[1:]:
        differs = [k for k in SAME if m.get(k) != first.get(k)]
        if m.get(FINGERPRINT) and first.get(FINGERPRINT) and m[FINGERPRINT] != first[FINGERPRINT]:
            differs.append(FINGERPRINT)
        if differs:
            raise PrepareError(f"{d} was prepared with another tokenizer than {metas[0][0]} ({', '.join(differs)} "
                               "differ); prepare every shard with the same --tokenizer")
    out = out.resolve()
    with staging(out) as tmp:
        shutil.copytree(metas[0][0] / "tokenizer", tmp / "tokenizer")
        meta = {"version": 1, "package_version": __version__, "tokenizer": first.get("tokenizer"),
                **{k: first[k] for k in SAME},
                **{k: sum(m.get(k, 0) for _, m in metas) for k in SUMMED},
                "split": "documents" if all(m.get("split") == "documents" for _, m in metas) else "mixed",
                "seed": first.get("seed"),
                "shards": [os.path.relpath(d.resolve(), out) for d, _ in metas],
                "sources": [s for _, m in metas for s in m.get("sources", [])]}
        text_tokens = meta["train_tokens"] + meta["valid_tokens"] - meta["documents"]
        meta["bytes_per_token"] = round((meta["train_bytes"] + meta["valid_bytes"]) / max(text_tokens, 1), 4)
        if all("tokenizer_fit" in m for _, m in metas):  # shards of an older version have none
            counts = {k: sum(m["tokenizer_fit"][k] for _, m in metas) for k in FIT_COUNTS}
            meta["tokenizer_fit"] = tokenizer_fit(counts, text_tokens, meta["train_bytes"] + meta["valid_bytes"])
        if all(m.get(FINGERPRINT) for _, m in metas):
            meta[FINGERPRINT] = first[FINGERPRINT]
        meta.update(screening_totals([m for _, m in metas]))
        if all("max_token_id" in m for _, m in metas):  # likewise: training then reads the older shards' ids
            meta["max_token_id"] = largest_ids([m for _, m in metas])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenization.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", nargs="+", type=Path, help="data directories written by prepare")
    p.add_argument("--out", type=Path, required=True, help="the merged data directory (holds no ids of its own)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = p.parse_args(argv)
    try:
        out = merge(args.shards, args.out, args.overwrite)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = json.loads((out / "meta.json").read_text())
    print(f"wrote {out}/: {len(meta['shards'])} shards, {meta['train_tokens']:,} train + {meta['valid_tokens']:,} "
          "valid tokens, read in place")
    if "tokenizer_fit" in meta:
        print_fit(meta["tokenizer_fit"], trained=str(meta.get("tokenizer")).startswith(TRAINED_BPE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
