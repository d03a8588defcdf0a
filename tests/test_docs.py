"""README.md and docs/*.md run as written: every option on a command line of ours is one that the
command accepts (asked of the real parsers, in-process), every relative link and image resolves,
every repository path they name exists, and README stays a front door that links every page."""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import re
import runpy
import shlex
import sys
import unicodedata
from pathlib import Path
from typing import Callable
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 230

# The package CLIs, by the module name that follows `-m`.
MODULES = ("accel_pretrain.train", "accel_pretrain.export", "accel_pretrain.evaluate", "accel_pretrain.generate",
           "accel_pretrain.plot", "tokenization.prepare", "tokenization.merge", "tokenization.sample_corpus")
PLACEHOLDER = re.compile(r"(^|/)[A-Z][A-Z_]*(\.\w+)?$")  # accelerate_configs/NAME.yaml: a name to fill in
SEPARATORS = {";", "&&", "||", "|", "&", ">", ">>", "<", "(", ")", "|&"}


# -- reading the pages ---------------------------------------------------------------------------

def fenced_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of each ``` block."""
    blocks, body, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if body is None:
                body, start = [], n + 1
            else:
                blocks.append((start, "\n".join(body)))
                body = None
        elif body is not None:
            body.append(line)
    assert body is None, f"a ``` block opened at line {start - 1} is never closed"
    return blocks


def prose(text: str) -> str:
    """The text outside ``` blocks (line numbers kept: block lines become empty)."""
    out, inside = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            inside = not inside
            out.append("")
        else:
            out.append("" if inside else line)
    return "\n".join(out)


def command_lines(page: Path) -> list[tuple[str, str]]:
    """(where, line) for every line of a ``` block, backslash continuations joined, and every inline
    `code span` that runs one of our commands."""
    text = page.read_text(encoding="utf-8")
    rel = page.relative_to(ROOT)
    out = []
    for start, body in fenced_blocks(text):
        joined, first = "", None
        for n, line in enumerate(body.splitlines(), start):
            first = n if first is None else first
            if line.endswith("\\"):
                joined += line[:-1] + " "
                continue
            out.append((f"{rel}:{first}", joined + line))
            joined, first = "", None
    for n, line in enumerate(prose(text).splitlines(), 1):
        for span in re.findall(r"`([^`]+)`", line):
            if re.search(r"python -m |accelerate launch|python benchmarks/|sbatch ", span):
                out.append((f"{rel}:{n}", span))
    return out


def shell_words(line: str) -> list[str]:
    """The line as the shell splits it: comments dropped, $(...) replaced by one word, operators
    (; && | > ...) as words of their own."""
    while True:  # innermost command or arithmetic substitution first
        new = re.sub(r"\$\(\([^()]*\)\)|\$\([^()]*\)", "SUBST", line)
        if new == line:
            break
        line = new
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def segments(words: list[str]) -> list[list[str]]:
    out, cur = [], []
    for w in words:
        if w in SEPARATORS or (w and set(w) <= set(";&|<>()")):
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    out.append(cur)
    return [s for s in out if s]


def options(words: list[str]) -> list[str]:
    """The --flags among words (a [--flag] placeholder too), without values."""
    found = []
    for w in words:
        w = w.lstrip("[")
        if re.search(r"\s", w):  # a quoted value such as --prepare_args "--tokenizer NAME"
            continue
        m = re.match(r"--([A-Za-z][\w-]*)", w)
        if m:
            found.append(m.group(1))
    return found


@functools.lru_cache(maxsize=None)
def invocations() -> tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...]], ...]:
    """(where, line, command, launcher words, argument words) of every call of ours in the pages.
    command: a module of MODULES, `benchmarks/NAME.py`, `slurm/NAME` or `make`."""
    out = []
    for page in PAGES:
        for where, line in command_lines(page):
            try:
                words = shell_words(line)
            except ValueError as e:
                if re.search(r"-m (accel_pretrain|tokenization)\.|benchmarks/\w+\.py", line):
                    pytest.fail(f"{where}: cannot split the command line {line!r} as a shell would ({e})")
                continue
            for seg in segments(words):
                for i, w in enumerate(seg):
                    if w == "-m" and i + 1 < len(seg) and re.match(r"(accel_pretrain|tokenization)\b", seg[i + 1]):
                        out.append((where, line, seg[i + 1], tuple(seg[:i]), tuple(seg[i + 2:])))
                        break
                    if re.fullmatch(r"(\./)?benchmarks/[\w.-]+\.py", w) and i > 0 and "python" in seg[i - 1]:
                        out.append((where, line, w.removeprefix("./"), tuple(seg[:i]), tuple(seg[i + 1:])))
                        break
                    if w == "sbatch" and i + 1 < len(seg):
                        out.append((where, line, seg[i + 1], tuple(seg[:i + 1]), tuple(seg[i + 2:])))
                        break
                    if w == "accelerate" and i + 1 < len(seg) and seg[i + 1] == "launch" and "-m" not in seg:
                        out.append((where, line, "accelerate launch", tuple(seg[:i + 2]), tuple(seg[i + 2:])))
                        break
                    if w == "make" and i == 0:
                        out.append((where, line, "make", (), tuple(seg[1:])))
                        break
    return tuple(out)


# -- what each command accepts, from its own parser ------------------------------------------------

class _Parsed(BaseException):
    """Raised instead of parsing: the parser a CLI built is all we want of it (BaseException, so no
    `except Exception` in the CLI swallows it)."""


def parser_options(run: Callable[[], object]) -> frozenset[str]:
    """The --options of the argparse parser that `run` builds and asks to parse (a CLI's main), read
    from the parser itself: nothing is parsed, printed or run past that point."""
    built: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        built.append(self)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            run()
        except _Parsed:
            pass
    assert built, f"{run} built no argparse parser"
    return frozenset(o[2:] for action in built[0]._actions for o in action.option_strings if o.startswith("--"))


def train_accepts(flag: str) -> bool:
    """As accel_pretrain.config parses train's command line (train.main answers -h/--help itself)."""
    from accel_pretrain.config import MODEL_FIELDS, TRAIN_FIELDS, parse_overrides
    from accel_pretrain.errors import UserError

    if flag == "help":
        return True
    try:
        parsed = parse_overrides([f"--{flag}", "1"])
    except UserError:
        return False
    return set(parsed) <= set(TRAIN_FIELDS) | set(MODEL_FIELDS) | {"config"}


@functools.lru_cache(maxsize=None)
def accepted(command: str) -> frozenset[str] | None:
    """The --flags a command accepts (None for train, which train_accepts answers flag by flag)."""
    if command == "accel_pretrain.train":
        return None
    if command in MODULES:
        module = importlib.import_module(command)
        return parser_options(lambda: module.main(["--help"]))
    if command.startswith("benchmarks/"):
        script = ROOT / command
        saved_argv, saved_path = sys.argv[:], sys.path[:]
        sys.argv = [str(script), "--help"]
        try:
            return parser_options(lambda: runpy.run_path(str(script), run_name="__main__"))
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
    if command == "accelerate launch":
        from accelerate.commands.launch import launch_command_parser

        return frozenset(o[2:] for a in launch_command_parser()._actions for o in a.option_strings if o.startswith("--"))
    raise AssertionError(command)


def bad_flags(command: str, flags: list[str]) -> list[str]:
    if command in ("accel_pretrain.train", "slurm/train.sbatch"):
        return [f for f in flags if not train_accepts(f)]
    ok = accepted(command)
    return [f for f in flags if f not in ok]


# -- the tests -----------------------------------------------------------------------------------

def test_every_option_on_a_documented_command_line_exists():
    """Every --flag after `-m MODULE` (or a benchmark script) on a command line of README.md or docs/
    is an option that command accepts; for `accelerate launch` lines, its own options and config
    file too; for `sbatch slurm/train.sbatch`, train's options; for `make`, a Makefile target."""
    calls = invocations()
    problems = []
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
    for where, line, command, launcher, args in calls:
        if command == "make":
            problems += [f"{where}: make has no target {t!r}" for t in args if not t.startswith("-") and t not in targets]
            continue
        if command.startswith("benchmarks/") or command.startswith("slurm/"):
            if not (ROOT / command).is_file():
                problems.append(f"{where}: {command} does not exist")
                continue
        if command.startswith("slurm/") and command != "slurm/train.sbatch":
            continue
        if command not in MODULES and not command.startswith(("benchmarks/", "slurm/")) and command != "accelerate launch":
            problems.append(f"{where}: no CLI module {command!r}")
            continue
        if "accelerate" in launcher or command == "accelerate launch":
            accel_words = list(launcher) + (list(args) if command == "accelerate launch" else [])
            for i, w in enumerate(accel_words):
                if w.startswith("--config_file") or w.startswith("--config-file"):
                    path = w.partition("=")[2] or (accel_words[i + 1] if i + 1 < len(accel_words) else "")
                    if not (ROOT / path).is_file() and not PLACEHOLDER.search(path):
                        problems.append(f"{where}: --config_file {path} does not exist")
            problems += [f"{where}: accelerate launch has no option --{f}"
                         for f in bad_flags("accelerate launch", options(accel_words))]
            if command == "accelerate launch":
                continue
        problems += [f"{where}: {command} has no option --{f}   ({line.strip()})" for f in bad_flags(command, options(args))]
    assert not problems, "\n".join(problems)


def test_the_docs_show_every_cli_and_the_train_flags_people_need():
    calls = invocations()
    shown = {c for _, _, c, _, _ in calls}
    assert set(MODULES) <= shown, f"no command line runs {sorted(set(MODULES) - shown)}"
    train_flags = {f.replace("-", "_") for _, _, c, _, args in calls
                   if c in ("accel_pretrain.train", "slurm/train.sbatch") for f in options(list(args))}
    # the divergence recipe and the step-up commands: resume with a lower lr, clip harder, accumulate more
    assert {"resume", "lr", "grad_clip", "gradient_accumulation_steps", "preset"} <= train_flags


def test_the_checker_catches_a_wrong_option():
    """The parsers answer no to what they do not take, so a misspelt flag in the docs fails above."""
    assert not train_accepts("max_step") and train_accepts("max_steps") and train_accepts("grad-clip")
    assert bad_flags("tokenization.prepare", ["tokenizer", "tokeniser"]) == ["tokeniser"]
    assert bad_flags("accel_pretrain.export", ["format", "dtype", "fmt"]) == ["fmt"]
    words = shell_words("accelerate launch -q --config_file accelerate_configs/cpu.yaml -m accel_pretrain.train "
                        "--lr 3e-4 [--dtype x] # --not_a_flag")
    assert options(words[words.index("accel_pretrain.train") + 1:]) == ["lr", "dtype"]


def github_slug(heading: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


@functools.lru_cache(maxsize=None)
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return frozenset(out)


def links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every markdown link, image and <img src> outside code."""
    out = []
    for n, line in enumerate(prose(page.read_text(encoding="utf-8")).splitlines(), 1):
        line = re.sub(r"`[^`]*`", "", line)
        out += [(n, t) for t in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)]
        out += [(n, t) for t in re.findall(r"<img[^>]*\ssrc=\"([^\"]+)\"", line)]
        out += [(n, t) for t in re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", line)]
    return out


def test_every_relative_link_and_image_resolves():
    problems = []
    for page in PAGES:
        for n, target in links(page):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}:{n}"
            if not file.exists():
                problems.append(f"{where}: {target} -> {file} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{where}: {target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_every_repository_path_named_in_the_docs_exists():
    """Paths such as `tests/test_faults.py` or accelerate_configs/fsdp.yaml, in code or prose."""
    pattern = r"(?<![\w./-])((?:accel_pretrain|tokenization|benchmarks|tests|slurm|accelerate_configs|docs)/[\w./-]*\w)"
    problems = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for path in re.findall(pattern, line):
                if "*" not in path and not (ROOT / path).exists() and not PLACEHOLDER.search(path):
                    problems.append(f"{page.relative_to(ROOT)}:{n}: {path} does not exist")
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door_to_every_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    linked = {(ROOT / t.partition("#")[0]).resolve() for _, t in links(README) if not re.match(r"[a-z]+:", t)}
    pages = {p.resolve() for p in (ROOT / "docs").glob("*.md")} | {(ROOT / "BENCHMARKS.md").resolve()}
    missing = sorted(str(p.relative_to(ROOT)) for p in pages - linked)
    assert not missing, f"README.md does not link {missing}"
    lines = text.splitlines()
    assert "<!-- suite-figure -->" in lines, "README.md lost the marker above the test suite's figure"
    assert lines[lines.index("<!-- suite-figure -->") + 1].strip(), "the test suite's figure must follow its marker"
