"""Read documents from .txt/.jsonl/.json/.parquet files, directories, globs and HF dataset names.

Every reader streams: a .txt document of any size arrives in parts of about PART_CHARS; a
json/jsonl/parquet record is the largest thing held in memory, never the corpus.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, NoReturn

from . import PrepareError

FRAGMENT_BYTES = 1 << 20  # longest piece of a line read at once
PART_CHARS = 1 << 20  # a long document is handed on in parts of about this many characters
Part = tuple[str, bool]  # (text, ends the document)


class DocPart(NamedTuple):
    """Text of one document, or of part of one; `last` marks its end; `doc` = (source ordinal, index)."""

    text: str
    last: bool
    doc: tuple[int, int]

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
KNOWN_SUFFIXES = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES


@dataclass
class Source:
    """One input: a local file or a Hugging Face dataset. `sha256` is filled while it is read."""

    kind: str  # "file" or "hf"
    name: str
    ordinal: int = 0  # position among all sources of the command line
    size_bytes: int | None = None
    sha256: str | None = None
    documents: int = 0
    blank_lines: int = 0  # a .txt read whole (--doc_separator none): the empty lines that end paragraphs
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


def prepared_dir(path: Path) -> bool:
    """A folder that prepare (or its --signatures_only step) wrote."""
    return path.is_dir() and (path / "meta.json").is_file() and any(
        (path / name).exists() for name in ("train_ids.npy", "tokenizer", "signatures.npz"))


def refuse_prepared(what: str) -> NoReturn:
    raise PrepareError(f"{what} is prepared data, not text; duplicates and benchmark text are removed while "
                       "preparing: run prepare again on the corpus it was made from (its meta.json lists "
                       "the sources) with --dedup / --decontaminate")


def resolve_sources(args: list[str], opts: ReadOptions) -> list[Source]:
    """Turn command-line arguments into a list of sources, failing early on anything missing."""
    sources: list[Source] = []
    for arg in args:
        path = Path(arg)
        if prepared_dir(path) or path.suffix == ".npy" or path.name == "meta.json" and prepared_dir(path.parent):
            refuse_prepared(arg)
        if path.is_dir():
            files = _dir_files(path)
            if inside := next((f.parent for f in files if f.name == "meta.json" and prepared_dir(f.parent)), None):
                refuse_prepared(f"{arg} holds {inside}, which")
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
    for i, src in enumerate(sources):
        src.ordinal = i
    return sources


def total_file_bytes(sources: list[Source]) -> int | None:
    """Bytes to read, for the progress bar; None when a streamed dataset has no known size."""
    if any(s.kind != "file" for s in sources):
        return None
    return sum(s.size_bytes or 0 for s in sources)


class _Decoder:
    """Incremental UTF-8 decoding of a file read in fragments, with errors located by line."""

    def __init__(self, src: Source, errors: str):
        import codecs

        self.src, self.errors = src, errors
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors)
        self.lineno = 1

    def __call__(self, raw: bytes, final: bool = False) -> str:
        try:
            text = self.decoder.decode(raw, final)
        except UnicodeDecodeError as e:
            raise PrepareError(f"{self.src.name}:{self.lineno}: not valid UTF-8 (byte {e.start} of the line); "
                               "convert it to UTF-8 or pass --errors replace") from None
        self.lineno += raw.count(b"\n")
        return text


def _check_not_binary(head: bytes, src: Source, errors: str) -> None:
    if b"\x00" in head[:8192] and errors == "strict":
        raise PrepareError(f"{src.name}: looks like a binary file (NUL bytes); pass only text corpora")


def _read_fragments(src: Source, lines: bool = True) -> Iterator[bytes]:
    """Yield a file's lines, a line longer than FRAGMENT_BYTES in several fragments (or, with
    lines=False, blocks of FRAGMENT_BYTES), hashing the file as it goes so each source is read once
    and nothing of any length is held whole."""
    h = hashlib.sha256()
    with open(src.name, "rb") as f:
        read = f.readline if lines else f.read
        for raw in iter(lambda: read(FRAGMENT_BYTES), b""):
            h.update(raw)
            yield raw
    src.sha256 = h.hexdigest()


class _DocParts:
    """One document assembled from text fragments and handed on in parts of about PART_CHARS, so a
    document of any size streams. Trailing whitespace is held back until the document ends: an
    all-blank document yields nothing and a document's final newlines can be dropped."""

    def __init__(self) -> None:
        self.buf: list[str] = []
        self.size = 0
        self.started = False

    def add(self, text: str) -> Iterator[Part]:
        self.buf.append(text)
        self.size += len(text)
        if self.size >= PART_CHARS:
            joined = "".join(self.buf)
            body = joined.rstrip()
            self.buf, self.size = [joined[len(body):]], len(joined) - len(body)
            if body:
                self.started = True
                yield body, False

    def end(self, strip_newlines: bool) -> Iterator[Part]:
        text = "".join(self.buf)
        if strip_newlines:
            text = text.rstrip("\r\n")
        if self.started or text.strip():
            yield text, True
        self.buf, self.size, self.started = [], 0, False


def _iter_txt(src: Source, opts: ReadOptions) -> Iterator[Part]:
    sep = opts.doc_separator
    decode = _Decoder(src, opts.errors)
    doc = _DocParts()
    first, tail = True, b""
    separators = src.blank_lines = 0  # counted anew each time the file is read
    for raw in _read_fragments(src, lines=sep != "none"):
        if first:
            _check_not_binary(raw, src, opts.errors)
            first = False
        line = decode(raw)
        if sep == "none":
            joined = tail + raw  # a blank line may straddle two blocks
            src.blank_lines += joined.count(b"\n\n") - tail.count(b"\n\n") + joined.count(b"\n\r\n")
            tail = raw[-2:]
            yield from doc.add(line)
            continue
        complete = raw.endswith(b"\n")
        if sep == "line":
            yield from doc.add(line)
            if complete:
                yield from doc.end(strip_newlines=True)
            continue
        is_sep = complete and ((not line.strip()) if sep == "blank" else line.rstrip("\r\n") == sep)
        if is_sep:
            separators += 1
            yield from doc.end(strip_newlines=True)
        else:
            yield from doc.add(line)
    tail = decode(b"", final=True)
    if tail:
        yield from doc.add(tail)
    yield from doc.end(strip_newlines=sep != "none")
    if sep not in ("none", "line", "blank") and separators == 0 and src.size_bytes:
        raise PrepareError(f"{src.name}: the separator line {sep!r} never occurs, so the whole file would be one "
                           "document; check --doc_separator (none, blank, line or a literal separator line)")


def _field(record: object, src: Source, where: str, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise PrepareError(f"{src.name}{where}: record has no {text_field!r} field; name it with --text_field")
    value = record[text_field]
    if not isinstance(value, str):
        raise PrepareError(f"{src.name}{where}: field {text_field!r} is {type(value).__name__}, not text")
    return value


def _iter_json(src: Source, opts: ReadOptions) -> Iterator[Part]:
    decode = _Decoder(src, opts.errors)
    fragments = _read_fragments(src)
    line: list[bytes] = []
    lineno = 0
    for raw in fragments:
        if lineno == 0 and not line:
            _check_not_binary(raw, src, opts.errors)
            if raw.lstrip().startswith(b"["):  # a JSON array: the one format that must be read whole
                try:
                    records = json.loads(decode(raw + b"".join(fragments), final=True))
                except json.JSONDecodeError as e:
                    raise PrepareError(f"{src.name}: invalid JSON ({e.msg} at line {e.lineno})") from None
                for i, rec in enumerate(records):
                    if (text := _field(rec, src, f"[{i}]", opts.text_field)).strip():
                        yield text, True
                return
        line.append(raw)
        if not raw.endswith(b"\n"):
            continue  # a record longer than one fragment: it must be parsed whole
        lineno += 1
        text = decode(b"".join(line)).strip()
        line = []
        if text and (doc := _json_line(text, src, lineno, opts)):
            yield doc, True
    text = decode(b"".join(line), final=True).strip()  # a last line without a newline
    if text and (doc := _json_line(text, src, lineno + 1, opts)):
        yield doc, True


def _json_line(text: str, src: Source, lineno: int, opts: ReadOptions) -> str | None:
    """The text of one jsonl record, None when it is blank."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{src.name}:{lineno}: invalid JSON line ({e.msg})") from None
    doc = _field(rec, src, f":{lineno}", opts.text_field)
    return doc if doc.strip() else None


def _iter_parquet(src: Source, opts: ReadOptions) -> Iterator[Part]:
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
            if value.strip():
                yield value, True
    h = hashlib.sha256()
    with open(src.name, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    src.sha256 = h.hexdigest()


def _iter_hf(src: Source, opts: ReadOptions) -> Iterator[Part]:
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.hf_config, split=src.hf_split, streaming=True)
    except Exception as e:  # hub, network and config errors come in many types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepareError(
            f"{src.name}: not a file, directory or loadable Hugging Face dataset ({reason})"
        ) from None
    for i, rec in enumerate(ds):
        if (text := _field(rec, src, f"[{i}]", opts.text_field)).strip():
            yield text, True


def _source_parts(src: Source, opts: ReadOptions) -> Iterator[Part]:
    if src.kind == "hf":
        return _iter_hf(src, opts)
    suffix = Path(src.name).suffix.lower()
    if suffix in JSON_SUFFIXES:
        return _iter_json(src, opts)
    if suffix in PARQUET_SUFFIXES:
        return _iter_parquet(src, opts)
    return _iter_txt(src, opts)


def iter_documents(sources: list[Source], opts: ReadOptions, shard: tuple[int, int] | None = None
                   ) -> Iterator[DocPart]:
    """The text of every non-blank document of every source, in order, as parts (a long .txt
    document arrives in several). Each part names its document as (source ordinal, index in that
    source), the same whether or not the corpus is sharded. shard=(I, N) keeps documents I, I+N,
    I+2N, ... of the whole stream; the other shards' documents are read and skipped."""
    seen = 0
    for src in sources:
        src.documents = 0
        index = 0
        for text, last in _source_parts(src, opts):
            mine = shard is None or seen % shard[1] == shard[0]
            if mine:
                yield DocPart(text, last, (src.ordinal, index))
            if last:
                src.documents += mine
                index += 1
                seen += 1
