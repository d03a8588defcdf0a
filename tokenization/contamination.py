"""Benchmark contamination: training documents that share a word n-gram (13 by default, GPT-3's and
NeMo Curator's method) with a document that `evaluate --tasks` scores.

A task's documents come from lm-eval's own task loading (tokenization.tasks), each as the text lm-eval
scores (the prompt) followed by the gold answer; the words every document of a task shares at its start and end (a template's "Question:" and
"Answer:") are not the item and are left out. A document shorter than n words, but of at least
SHORT_WORDS, counts as one n-gram of its whole length; shorter ones are too common to be evidence."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tasks import load_tasks, require_lm_eval
from .words import DocWords, ngram_hashes, normalized_words, word_hashes

SHORT_WORDS = 8


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def prompt(task: Any, doc: dict) -> str:
    """The prompt lm-eval scores; where that is not text (winogrande's is an index into its choices),
    lm-eval's decontamination query."""
    text = task.doc_to_text(doc)
    if not isinstance(text, str) and task.should_decontaminate():
        with contextlib.suppress(Exception):  # lm-eval parses some rendered queries as Python literals
            text = task.doc_to_decontamination_query(doc)
    return _text(text)


def gold_answer(task: Any, doc: dict) -> str:
    """The correct continuation of a document: the gold choice, or the target text."""
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        index = target[0] if isinstance(target, list) and target else target
        if isinstance(index, int) and 0 <= index < len(choices):
            return _text(choices[index])
        return _text(index)
    return _text(target[0] if isinstance(target, list) and target else target)


def task_documents(task: Any) -> list[list[bytes]]:
    """The normalised words of each evaluation document of a task, template words left out."""
    docs = list(task.eval_docs)
    prompts = [normalized_words(prompt(task, d)) for d in docs]
    head = tail = 0
    if len(prompts) > 1:
        shortest = min(len(p) for p in prompts)
        while head < shortest and len({p[head] for p in prompts}) == 1:
            head += 1
        while tail < shortest - head and len({p[len(p) - 1 - tail] for p in prompts}) == 1:
            tail += 1
    return [p[head:len(p) - tail] + normalized_words(gold_answer(task, d)) for p, d in zip(prompts, docs)]


@dataclass
class Index:
    """Sorted n-gram hashes of every evaluation document, by n-gram length, with their owners."""

    ngram: int
    names: list[str]
    sizes: list[int]  # documents per task
    short: list[int]  # documents per task too short to check
    tables: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def lookup(self, hashes: np.ndarray) -> set[tuple[int, int]]:
        """(task, document) pairs that share an n-gram with a run of words whose hashes these are."""
        hits: set[tuple[int, int]] = set()
        for length, (table, tasks, docs) in self.tables.items():
            grams = ngram_hashes(hashes, length)
            at = np.searchsorted(table, grams)
            found = np.unique(grams[table[np.minimum(at, len(table) - 1)] == grams])
            for g in found:
                lo, hi = np.searchsorted(table, g, "left"), np.searchsorted(table, g, "right")
                hits.update(zip(tasks[lo:hi].tolist(), docs[lo:hi].tolist()))
        return hits


def build_index(names: list[str], tasks_dir: str | None, ngram: int) -> Index:
    require_lm_eval("--decontaminate")
    _, loaded = load_tasks(tuple(names), tasks_dir)
    tasks = loaded["tasks"]
    index = Index(ngram, list(tasks), [], [])
    grams: dict[int, list[tuple[np.ndarray, int, int]]] = {}
    shortest = min(SHORT_WORDS, ngram)  # n-grams shorter than 8 words check documents of that length too
    for t, task in enumerate(tasks.values()):
        documents = task_documents(task)
        index.sizes.append(len(documents))
        index.short.append(sum(len(w) < shortest for w in documents))
        for d, words in enumerate(documents):
            if len(words) >= shortest:
                length = min(ngram, len(words))
                grams.setdefault(length, []).append((ngram_hashes(word_hashes(words), length), t, d))
    for length, rows in grams.items():
        table = np.concatenate([g for g, _, _ in rows])
        owner_t = np.concatenate([np.full(len(g), t, np.int32) for g, t, _ in rows])
        owner_d = np.concatenate([np.full(len(g), d, np.int64) for g, _, d in rows])
        order = np.argsort(table, kind="stable")
        index.tables[length] = (table[order], owner_t[order], owner_d[order])
    return index


class Checker:
    """Streams a corpus's document parts; collects, per training document, the evaluation documents
    it shares an n-gram with."""

    def __init__(self, index: Index):
        self.index = index
        self.hits: dict[tuple[int, int], set[tuple[int, int]]] = {}  # training document -> (task, eval doc)
        self._words = DocWords(index.ngram - 1)
        self._found: set[tuple[int, int]] = set()

    def add(self, text: str, last: bool, doc: tuple[int, int]) -> None:
        _, hashes = self._words.feed(text, last)
        self._found |= self.index.lookup(hashes)
        if last:
            if self._found:
                self.hits[doc] = self._found
            self._found = set()

    def stats(self, mode: str) -> dict:
        """meta.json's contamination: per task, evaluation and training documents hit."""
        out = {}
        for t, name in enumerate(self.index.names):
            train = [d for d, found in self.hits.items() if any(task == t for task, _ in found)]
            evals = sorted({e for found in self.hits.values() for task, e in found if task == t})
            out[name] = {"eval_documents": self.index.sizes[t], "eval_documents_too_short": self.index.short[t],
                         "eval_documents_hit": len(evals), "train_documents_hit": len(train),
                         "ngram": self.index.ngram, "mode": mode, "eval_hits": evals}
        return out
