"""Read documents from .txt/.jsonl/.json/.parquet files, directories, globs and HF dataset names.

Every reader streams: a document is the largest thing held in memory, never the corpus.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import PrepareError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES


@dataclass
class Source:
    """One input: a local file or a Hugging Face dataset. `sha256` is filled while it is read."""

    kind: str  # "file" or "hf"
    name: str
    size_bytes: int | None = None
    sha256: str | None = None
    documents: int = 0
    hf_config: str | None = None
    hf_split: str | None = None
    _hash: object = field(default=None, repr=False)

    def info(self) -> dict:
        out = {"kind": self.kind, "name": self.name, "documents": self.documents}
        if self.kind == "file":
            out.update(size_bytes=self.size_bytes, sha256=self.sha256)
        else:
            out.update(config=self.hf_config, split=self.hf_split)
        return out


@dataclass
class ReadOptions:
    text_field: str = "text"
    doc_separator: str = "none"  # none | blank | line | any literal separator line
    errors: str = "strict"  # strict | replace
    hf_config: str | None = None
    hf_split: str = "train"


def _looks_like_glob(arg: str) -> bool:
    return any(ch in arg for ch in "*?[")


def _dir_files(path: Path) -> list[Path]:
    files = [
        p for p in sorted(path.rglob("*"))
        if p.is_file() and p.suffix.lower() in KNOWN_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise PrepareError(f"directory {path} holds no .txt, .jsonl, .json or .parquet files")
    return files


def resolve_sources(args: list[str], opts: ReadOptions) -> list[Source]:
    """Turn command-line arguments into a list of sources, failing early on anything missing."""
    sources: list[Source] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            files = _dir_files(path)
        elif path.is_file():
            files = [path]
        elif _looks_like_glob(arg):
            files = [Path(p) for p in sorted(glob.glob(arg, recursive=True)) if Path(p).is_file()]
            if not files:
                raise PrepareError(f"no files match {arg!r}")
        elif path.suffix.lower() in KNOWN_SUFFIXES or os.sep in arg and arg.startswith((".", os.sep)):
            raise PrepareError(f"{arg}: no such file or directory")
        else:
            sources.append(Source("hf", arg, hf_config=opts.hf_config, hf_split=opts.hf_split))
            continue
        for f in files:
            sources.append(Source("file", str(f), size_bytes=f.stat().st_size))
    if not sources:
        raise PrepareError("no input given: pass corpus files, directories, globs or dataset names")
    return sources


def total_file_bytes(sources: list[Source]) -> int | None:
    """Bytes to read, for the progress bar; None when a streamed dataset has no known size."""
    if any(s.kind != "file" for s in sources):
        return None
    return sum(s.size_bytes or 0 for s in sources)


def _decode(raw: bytes, src: Source, where: str, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise PrepareError(
            f"{src.name}{where}: not valid UTF-8 (byte {e.start}); convert it to UTF-8 or pass --errors replace"
        ) from None


def _check_not_binary(head: bytes, src: Source, errors: str) -> None:
    if b"\x00" in head[:8192] and errors == "strict":
        raise PrepareError(f"{src.name}: looks like a binary file (NUL bytes); pass only text corpora")


def _read_lines(src: Source) -> Iterator[bytes]:
    """Yield raw lines of a file while hashing it, so each source is read once."""
    h = hashlib.sha256()
    with open(src.name, "rb") as f:
        for line in f:
            h.update(line)
            yield line
    src.sha256 = h.hexdigest()


def _iter_txt(src: Source, opts: ReadOptions) -> Iterator[str]:
    sep = opts.doc_separator
    first = True
    if sep == "none":
        raw = b"".join(_read_lines(src))
        _check_not_binary(raw, src, opts.errors)
        text = _decode(raw, src, "", opts.errors)
        if text.strip():
            yield text
        return
    buf: list[str] = []
    for lineno, raw in enumerate(_read_lines(src), 1):
        if first:
            _check_not_binary(raw, src, opts.errors)
            first = False
        line = _decode(raw, src, f":{lineno}", opts.errors)
        if sep == "line":
            doc = line.rstrip("\r\n")
            if doc.strip():
                yield doc
            continue
        is_sep = (not line.strip()) if sep == "blank" else line.rstrip("\r\n") == sep
        if is_sep:
            if buf:
                doc = "".join(buf).rstrip("\r\n")
                if doc.strip():
                    yield doc
                buf = []
        else:
            buf.append(line)
    if buf:
        doc = "".join(buf).rstrip("\r\n")
        if doc.strip():
            yield doc


def _field(record: object, src: Source, where: str, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise PrepareError(f"{src.name}{where}: record has no {text_field!r} field; name it with --text_field")
    value = record[text_field]
    if not isinstance(value, str):
        raise PrepareError(f"{src.name}{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _iter_json(src: Source, opts: ReadOptions) -> Iterator[str]:
    lines = _read_lines(src)
    for lineno, raw in enumerate(lines, 1):
        if lineno == 1:
            _check_not_binary(raw, src, opts.errors)
            if raw.lstrip().startswith(b"["):  # a JSON array: the one format that must be read whole
                rest = raw + b"".join(lines)
                try:
                    records = json.loads(_decode(rest, src, "", opts.errors))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{src.name}: invalid JSON ({e.msg} at line {e.lineno})") from None
                for i, rec in enumerate(records):
                    yield _field(rec, src, f"[{i}]", opts.text_field)
                return
        text = _decode(raw, src, f":{lineno}", opts.errors).strip()
        if not text:
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{src.name}:{lineno}: invalid JSON line ({e.msg})") from None
        yield _field(rec, src, f":{lineno}", opts.text_field)


def _iter_parquet(src: Source, opts: ReadOptions) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(src.name)
    except Exception as e:  # pyarrow raises several types for a corrupt or non-parquet file
        raise PrepareError(f"{src.name}: not a readable parquet file ({e})") from None
    if opts.text_field not in pf.schema_arrow.names:
        raise PrepareError(
            f"{src.name}: no column {opts.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "name it with --text_field"
        )
    for batch in pf.iter_batches(columns=[opts.text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                raise PrepareError(f"{src.name}: a record has an empty {opts.text_field!r} field")
            yield value
    h = hashlib.sha256()
    with open(src.name, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    src.sha256 = h.hexdigest()


def _iter_hf(src: Source, opts: ReadOptions) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.hf_config, split=src.hf_split, streaming=True)
    except Exception as e:  # hub, network and config errors come in many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepareError(
            f"{src.name}: not a file, directory or loadable Hugging Face dataset ({reason})"
        ) from None
    for i, rec in enumerate(ds):
        yield _field(rec, src, f"[{i}]", opts.text_field)


def iter_documents(sources: list[Source], opts: ReadOptions) -> Iterator[str]:
    """All documents of all sources, in order. Empty documents are skipped."""
    for src in sources:
        src.documents = 0
        if src.kind == "hf":
            docs = _iter_hf(src, opts)
        else:
            suffix = Path(src.name).suffix.lower()
            if suffix in JSON_SUFFIXES:
                docs = _iter_json(src, opts)
            elif suffix in PARQUET_SUFFIXES:
                docs = _iter_parquet(src, opts)
            else:
                docs = _iter_txt(src, opts)
        for doc in docs:
            if doc.strip():
                src.documents += 1
                yield doc
