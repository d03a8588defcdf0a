"""CLI: build a sample corpus from the Python standard library's docstrings, so the quick start
needs no download and no file from the user.

    python -m tokenization.sample_corpus demo/corpus.jsonl [--max_mb 8]

One JSON line per module: its docstring followed by those of its classes and functions.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterator


def module_documents(stdlib: Path) -> Iterator[str]:
    """Docstrings of every stdlib module, in a fixed order so the corpus is the same on every run."""
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40 and doc not in docs:
                    docs.append(doc)
        if docs:
            yield "\n\n".join(docs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tokenization.sample_corpus", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output .jsonl file")
    p.add_argument("--max_mb", type=float, default=8.0, help="stop after this many megabytes of text")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    limit, size, n = int(args.max_mb * 1e6), 0, 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in module_documents(Path(sysconfig.get_paths()["stdlib"])):
            f.write(json.dumps({"text": doc}) + "\n")
            size += len(doc.encode("utf-8"))
            n += 1
            if size >= limit:
                break
    os.replace(tmp, out)
    print(f"wrote {out}: {n} documents, {size / 1e6:.1f} MB of standard-library docstrings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
