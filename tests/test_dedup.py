"""Duplicates and benchmark contamination, found and removed while preparing (tokenization/screen.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import WORDS, make_documents
from tests.helpers import TASKS_DIR
from tokenization.prepare import main

BASE = make_documents(60, seed=21, min_words=40, max_words=90)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def near(doc: str, seed: int) -> str:
    """The same document with one word in about forty changed: a near duplicate (Jaccard of 5-grams ~0.85)."""
    words = doc.split()
    rng = random.Random(seed)
    i = rng.randrange(10, len(words) - 10)
    return " ".join(words[:i] + ["zebra"] + words[i + 1:])


def meta(d: Path) -> dict:
    return json.loads((d / "meta.json").read_text())


def ids(d: Path) -> tuple[np.ndarray, np.ndarray]:
    m = meta(d)
    roots = [(d / s).resolve() for s in m["shards"]] if "shards" in m else [d]
    return tuple(np.concatenate([np.load(r / f"{split}_ids.npy") for r in roots]) for split in ("train", "valid"))


def test_exact_and_near_duplicates_drop_whole_documents_keeping_the_first(tmp_path, data_dir, capsys):
    """Copies that differ in case, punctuation and spacing are exact duplicates of the normalised
    text; a copy with one word changed is a near duplicate that only minhash finds. The output equals
    preparing the corpus with those documents removed by hand, so whole documents went before encoding."""
    docs = list(BASE)
    docs.insert(10, "  " + docs[3].upper().replace(" ", "   ").replace(".", "!") + "\n")  # exact copy of 3
    docs.insert(20, near(docs[5], 1))  # near copy of 5
    docs.insert(30, docs[3])  # another exact copy of 3
    docs.append(near(docs[20], 2))  # near copy of the near copy: the group keeps 5
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    tok = str(data_dir / "tokenizer")
    capsys.readouterr()
    expected = {"exact": {10: 3, 30: 3}, "minhash": {10: 3, 20: 5, 30: 3, len(docs) - 1: 5}}
    for method, dropped in expected.items():
        out, report = tmp_path / method, tmp_path / f"{method}.jsonl"
        assert main([str(corpus), "--tokenizer", tok, "--out", str(out), "--dedup", method,
                     "--dedup_report", str(report)]) == 0
        assert f"dedup {method}: dropped {len(dropped)} of {len(docs)} documents" in capsys.readouterr().out
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        assert {r["dropped"]["document"]: r["kept"]["document"] for r in rows} == dropped
        chained = {r["dropped"]["document"]: r["similarity"] for r in rows}.pop(len(docs) - 1, None)
        assert all(r["similarity"] >= 0.75 for r in rows if r["dropped"]["document"] != len(docs) - 1), rows
        assert chained is None or 0.5 < chained < 1  # like its group's first through the copy in between
        d = meta(out)["dedup"]
        assert (d["method"], d["documents_in"], d["documents_dropped"]) == (method, len(docs), len(dropped))
        assert d["bytes_dropped"] == sum(len(docs[i].encode()) for i in dropped)
        assert meta(out)["documents"] == len(docs) - len(dropped)
        by_hand = write_jsonl(tmp_path / f"{method}_by_hand.jsonl",
                              [doc for i, doc in enumerate(docs) if i not in dropped])
        assert main([str(by_hand), "--tokenizer", tok, "--out", str(tmp_path / f"{method}_hand"), "--dedup",
                     "none"]) == 0
        assert "dedup" not in meta(tmp_path / f"{method}_hand")
        # the split is keyed by document ids, which dropping shifts here: compare all the tokens kept
        assert sorted(np.concatenate(ids(out)).tolist()) == sorted(np.concatenate(
            ids(tmp_path / f"{method}_hand")).tolist())
    m = meta(tmp_path / "minhash")["dedup"]["settings"]
    assert (m["ngram"], m["num_perm"], m["bands"], m["rows"], m["threshold"]) == (5, 112, 14, 8, 0.75)


def test_text_pasted_from_another_source_is_the_same_words():
    """Composed and decomposed accents, full-width letters, ligatures, soft hyphens and zero-width
    spaces (NFKC, format characters removed): the same words, so the same exact key and n-grams."""
    import unicodedata

    from tokenization.corpus import DocPart
    from tokenization.dedup import DedupSettings, sign

    text = "Le café de l'été: une ﬁne crème brûlée, servie à ＧＥＮÈＶＥ. " * 3
    other = unicodedata.normalize("NFD", text).replace("crème", "cr\u00adème").replace("une ", "une\u200b ")
    assert other != text
    for method in ("exact", "minhash"):
        keys = sign([DocPart(t, True, (0, i)) for i, t in enumerate((text, other))], DedupSettings(method)).keys
        assert np.array_equal(keys[0], keys[1])


def test_a_document_in_parts_signs_as_the_whole_one():
    """A long .txt document arrives in parts cut anywhere (even inside a word): its signature is the
    one of the whole text, for both methods."""
    from tokenization.corpus import DocPart
    from tokenization.dedup import DedupSettings, sign

    text = " ".join(random.Random(0).choice(WORDS) for _ in range(3000))
    for method in ("exact", "minhash"):
        settings = DedupSettings(method)
        whole = sign([DocPart(text, True, (0, 0))], settings)
        cuts = sorted(random.Random(1).sample(range(1, len(text)), 40))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        parts = sign([DocPart(p, i == len(pieces) - 1, (0, 0)) for i, p in enumerate(pieces)], settings)
        assert np.array_equal(whole.keys, parts.keys) and whole.words[0] == parts.words[0] == 3000
        assert whole.sizes[0] == parts.sizes[0] == len(text)


def test_sharded_dedup_in_two_steps_equals_the_unsharded_one(tmp_path, data_dir, capsys):
    """Duplicates across shards, by file and by document: every shard signs its part, then prepares
    with all signatures; merged, the ids (by document: their multiset, in another order) and the dedup
    counts are the unsharded preparation's."""
    from tokenization.merge import main as merge

    tok = str(data_dir / "tokenizer")
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", make_documents(45, seed=40 + i, min_words=30)) for i in range(3)]
    first = json.loads(files[0].read_text().splitlines()[4])["text"]
    write_jsonl(files[2], [near(first, 3), *[json.loads(x)["text"] for x in files[2].read_text().splitlines()],
                           first])
    many = make_documents(90, seed=22, min_words=30)  # shards of 40 documents or more split by document
    one = write_jsonl(tmp_path / "one.jsonl", [*many, many[7], near(many[2], 4)])
    for name, inputs, shards in (("file", files, 3), ("document", [one], 2)):
        whole = tmp_path / f"{name}_whole"
        assert main([*map(str, inputs), "--tokenizer", tok, "--out", str(whole), "--dedup", "minhash"]) == 0
        assert meta(whole)["dedup"]["documents_dropped"] == 2
        common = [*map(str, inputs), "--tokenizer", tok, "--dedup", "minhash", "--num_shards", str(shards)]
        assert main([*common, "--shard_index", "0", "--out", str(tmp_path / "x")]) == 2
        assert "needs every shard's signatures" in capsys.readouterr().err
        for i in range(shards):  # signing encodes nothing: no tokenizer needed
            assert main([*map(str, inputs), "--dedup", "minhash", "--num_shards", str(shards), "--shard_index", str(i),
                         "--signatures_only", "--out", str(tmp_path / f"{name}_sigs" / f"s{i}")]) == 0
        parts = []
        for i in range(shards):
            parts.append(tmp_path / f"{name}_shard{i}")
            assert main([*common, "--shard_index", str(i), "--dedup_signatures", str(tmp_path / f"{name}_sigs"),
                         "--out", str(parts[-1])]) == 0
            assert meta(parts[-1])["shard"]["by"] == name
        assert merge([*map(str, parts), "--out", str(tmp_path / f"{name}_merged")]) == 0
        merged = meta(tmp_path / f"{name}_merged")
        assert merged["dedup"] == {**{k: v for k, v in meta(whole)["dedup"].items() if k != "seconds"},
                                   "across_inputs": True}
        for a, b in zip(ids(whole), ids(tmp_path / f"{name}_merged")):  # by document: shards interleave
            assert np.array_equal(a, b) if name == "file" else np.array_equal(np.sort(a), np.sort(b))
    capsys.readouterr()
    step_two = ["--tokenizer", tok, "--num_shards", "3", "--shard_index", "1", "--dedup_signatures",
                str(tmp_path / "file_sigs"), "--out", str(tmp_path / "y")]
    # what step two must share with step one, or its ids would name other documents: each refused in one line
    text = files[1].read_text()
    files[1].write_text(text.replace(" a ", " A ", 1))  # same size, other bytes
    for args, expected in ((["--dedup", "exact", *map(str, files)], "other settings"),
                           (["--dedup", "minhash", *map(str, files[::-1])], "in another order"),
                           (["--dedup", "minhash", "--text_field", "body", *map(str, files)], "other options (text_field)"),
                           (["--dedup", "minhash", *map(str, files)], f"{files[1]} changed since its signatures")):
        assert main([*args, *step_two]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
        assert not (tmp_path / "y").exists()


def planted_items() -> tuple[dict[str, list[int]], list[str]]:
    """HellaSwag and ARC items as their datasets hold them (context and gold ending; question and gold
    answer), read from tests/tasks' data without lm-eval, pasted each into a document of its own. The
    HellaSwag items share no 13-gram with another of the slice (consecutive clips of one video do,
    and are then found too); ARC's 12 has 9 words, fewer than 13."""
    import datasets

    items: dict[str, list[int]] = {"hellaswag_local": [0, 7, 23, 36], "arc_easy_local": [2, 12, 25, 38]}
    hs = datasets.load_from_disk(str(TASKS_DIR / "data" / "hellaswag" / "validation"))
    arc = datasets.load_from_disk(str(TASKS_DIR / "data" / "arc_easy" / "validation"))
    texts = [f"{hs[i]['ctx']} {hs[i]['endings'][int(hs[i]['label'])]}" for i in items["hellaswag_local"]]
    for i in items["arc_easy_local"]:
        row = arc[i]
        texts.append(f"{row['question']} {row['choices']['text'][row['choices']['label'].index(row['answerKey'])]}")
    return items, texts


def test_planted_benchmark_items_are_caught_item_for_item_and_evaluate_warns(tmp_path, data_dir, capsys):
    """A corpus with HellaSwag and ARC items pasted into some documents: exactly those documents and
    those items are found (drop: removed; report: kept and said, and evaluate warns next to the task
    scored on that data); the clean corpus gives zero hits."""
    from accel_pretrain import evaluate
    from accel_pretrain.errors import run_cli
    from tests.helpers import TINY, train

    items, texts = planted_items()
    docs = list(BASE)
    hosts = [3, 9, 14, 22, 31, 40, 47, 55]
    for host, text in zip(hosts, texts):
        words = docs[host].split()
        docs[host] = " ".join(words[:20]) + " " + text + " " + " ".join(words[20:])
    tok = str(data_dir / "tokenizer")
    tasks = "hellaswag_local,arc_easy_local"
    for name, corpus, mode in (("dirty", docs, "drop"), ("kept", docs, "report"), ("clean", BASE, "drop")):
        out, report = tmp_path / name, tmp_path / f"{name}.jsonl"
        assert main([str(write_jsonl(tmp_path / f"{name}.in.jsonl", corpus)), "--tokenizer", tok, "--out", str(out),
                     "--decontaminate", tasks, "--tasks_dir", str(TASKS_DIR), "--decontaminate_mode", mode,
                     "--dedup_report", str(report)]) == 0
        found = meta(out)["contamination"]
        rows = [json.loads(line) for line in report.read_text().splitlines()]
        if name == "clean":
            assert all(c["eval_documents_hit"] == c["train_documents_hit"] == 0 for c in found.values())
            assert rows == [] and meta(out)["documents"] == len(BASE)
            continue
        for task, planted in items.items():
            assert found[task]["eval_hits"] == planted and found[task]["train_documents_hit"] == len(planted)
            assert found[task]["ngram"] == 13 and found[task]["mode"] == mode
        assert [r["document"]["document"] for r in rows] == hosts
        assert meta(out)["documents"] == len(docs) - (len(hosts) if mode == "drop" else 0)
    assert "contamination hellaswag_local: 4 training documents share a 13-gram with 4 of its 40" in capsys.readouterr().out

    run = tmp_path / "run"
    capsys.readouterr()
    assert train("--data", tmp_path / "kept", "--out", run, *TINY, "--max_steps", 1, "--eval_interval", 1,
                 "--save_interval", 1, "--eval_tasks", "local_tasks", "--eval_tasks_dir", TASKS_DIR,
                 "--eval_tasks_limit", 1) == 0  # a tag: the warning names its tasks that the data contains
    err = capsys.readouterr().err
    assert "warning: hellaswag_local: the training data contains 4 of its documents" in err
    assert "warning: arc_easy_local: the training data contains" in err and "piqa_local:" not in err
    assert run_cli(evaluate.main, [str(run), "--tasks", "hellaswag_local,text_local", "--tasks_dir", str(TASKS_DIR),
                                   "--limit", "2", "--output", str(tmp_path / "e.json")]) == 0
    out, err = capsys.readouterr()
    assert "warning: hellaswag_local: the training data contains 4 of its documents" in err and "text_local:" not in err
    assert "hellaswag_local [contaminated] | acc" in out and "text_local [contaminated]" not in out
    scored = json.loads((tmp_path / "e.json").read_text())
    assert scored["contaminated"] == {"hellaswag_local": {"eval_documents_hit": 4, "train_documents_hit": 4}}


@pytest.mark.parametrize("args,expected", [
    (["--dedup", "fuzzy"], "--dedup 'fuzzy': choose one of none, exact, minhash"),
    (["--dedup", "minhash", "--dedup_threshold", "1.5"], "--dedup_threshold 1.5 must be in (0, 1]"),
    (["--dedup", "minhash", "--dedup_threshold", "0"], "--dedup_threshold 0.0 must be in (0, 1]"),
    (["--decontaminate", "hellaswag_locl", "--tasks_dir", str(TASKS_DIR)], "did you mean hellaswag_local"),
    (["--decontaminate_mode", "keep"], "choose drop or report"),
    (["--dedup", "none", "--signatures_only"], "the two steps of a sharded dedup: name --dedup exact or minhash"),
    (["--signatures_only", "--dedup_signatures", str(TASKS_DIR)], "run them one after the other"),
    (["--dedup_threshold", "0.8"], "add --dedup minhash"),  # exact is the default: the threshold would be ignored
    (["--decontaminate", " , "], "names no task"),
    (["--dedup_report", str(TASKS_DIR)], "is a directory; name a file"),
    (["--dedup", "none", "--dedup_report", "r.jsonl"], "there is nothing to report"),
    (["--dedup_report", "CORPUS"], "exists; pass --overwrite to replace it"),  # the user's file stays
])
def test_screening_mistakes_are_one_line(tmp_path, jsonl_corpus, data_dir, capsys, args, expected):
    before = jsonl_corpus.read_bytes()
    args = [str(jsonl_corpus) if a == "CORPUS" else a for a in args]
    assert main([str(jsonl_corpus), "--tokenizer", str(data_dir / "tokenizer"), "--out", str(tmp_path / "o"),
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists() and jsonl_corpus.read_bytes() == before


def test_dedup_of_prepared_data_says_to_prepare_again(tmp_path, data_dir, capsys):
    """The folder, one of its files, or a folder above it: each named, none read as text."""
    import shutil

    shutil.copytree(data_dir, tmp_path / "runs" / "data")
    for given in (data_dir, data_dir / "train_ids.npy", data_dir / "meta.json", tmp_path / "runs"):
        assert main([str(given), "--dedup", "minhash", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is prepared data, not text" in err[0] and "run prepare again on the corpus" in err[0]


def test_groups_join_across_bands_and_keep_their_smallest_member():
    """The vectorised grouping against a plain union-find, on random edges given in several rounds
    (one per LSH band): every document ends labelled with the smallest index of its group."""
    from tokenization.dedup import _components

    rng = np.random.default_rng(0)
    n = 500
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    label = np.arange(n)
    for _ in range(6):
        a, b = rng.integers(0, n, 120), rng.integers(0, n, 120)
        label = _components(label, a, b)
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = root(x), root(y)
            parent[max(rx, ry)] = min(rx, ry)
        assert label.tolist() == [root(i) for i in range(n)]
