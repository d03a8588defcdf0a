"""meta.json's max_token_id: prepare and merge record each split's largest id, so check_ids_below
reads no ids at a start or requeue; data that predates the field is still scanned and refused."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from accel_pretrain.data import Ids, TokenData
from accel_pretrain.errors import UserError
from tests.conftest import WORDS, build_wordlevel_tokenizer
from tokenization.merge import largest_ids
from tokenization.merge import main as merge_main
from tokenization.prepare import main as prepare_main

RARE = "ωωω"  # after every word of WORDS: the largest id; in one document only, so maxima differ
SPLITS = ("train", "valid")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """One corpus prepared whole, as two shards by document, and the shards merged."""
    root = tmp_path_factory.mktemp("max_id")
    tok = build_wordlevel_tokenizer(root / "tok", [*WORDS, RARE])
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(80)]
    docs[1] += f" {RARE}"  # document 1 goes to shard 1: the merged maximum is not the first shard's
    corpus = root / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert prepare_main([str(corpus), "--tokenizer", str(tok), "--out", str(root / "whole")]) == 0
    for i in range(2):
        assert prepare_main([str(corpus), "--tokenizer", str(tok), "--out", str(root / f"shard_{i}"),
                             "--num_shards", "2", "--shard_index", str(i), "--dedup", "none"]) == 0
    assert merge_main([str(root / "shard_0"), str(root / "shard_1"), "--out", str(root / "merged")]) == 0
    return root


def _meta(d: Path) -> dict:
    return json.loads((d / "meta.json").read_text())


def _tamper(d: Path, split: str, value: int) -> None:
    """Write an id into a split on disk, leaving meta.json as it was."""
    ids = np.load(d / f"{split}_ids.npy", mmap_mode="r+")
    ids[len(ids) // 2] = value
    ids.flush()


def _forget_record(d: Path) -> None:
    """Make d look prepared by a version before max_token_id."""
    meta = _meta(d)
    del meta["max_token_id"]
    (d / "meta.json").write_text(json.dumps(meta))


def _refusal(split: str, top: int, vocab_size: int) -> str:
    return (f"{split}_ids.npy holds token id {top}, but the model's vocabulary has {vocab_size} entries; "
            "the data and the model do not belong together")


def test_prepare_and_merge_record_each_splits_largest_id(prepared):
    for d in ("whole", "shard_0", "shard_1"):
        recorded = _meta(prepared / d)["max_token_id"]
        assert recorded == {s: int(np.load(prepared / d / f"{s}_ids.npy").max()) for s in SPLITS}, d
        assert all(type(v) is int for v in recorded.values())
    whole = _meta(prepared / "whole")["max_token_id"]
    assert whole["train"] != whole["valid"]  # the rare word lies in one split only
    shard_tops = [_meta(prepared / f"shard_{i}")["max_token_id"] for i in range(2)]
    assert shard_tops[0] != shard_tops[1]
    assert _meta(prepared / "merged")["max_token_id"] == whole == {
        s: max(t[s] for t in shard_tops) for s in SPLITS}


def test_recorded_ids_are_trusted_and_refuse_a_small_vocabulary(prepared, tmp_path):
    d = tmp_path / "whole"
    shutil.copytree(prepared / "whole", d)
    top = _meta(d)["max_token_id"]["train"]
    _tamper(d, "train", 60_000)  # were the ids read, this id would be refused
    data = TokenData(d)
    data.check_ids_below(top + 1)
    with pytest.raises(UserError) as e:
        data.check_ids_below(top)
    assert str(e.value) == _refusal("train", top, top)


def test_data_without_the_record_is_scanned_and_keeps_its_fingerprint(prepared, tmp_path):
    d = tmp_path / "whole"
    shutil.copytree(prepared / "whole", d)
    before = TokenData(d).fingerprint()
    _forget_record(d)
    assert TokenData(d).fingerprint() == before  # checkpoints of older data resume
    TokenData(d).check_ids_below(_meta(prepared / "whole")["vocab_size"])
    _tamper(d, "valid", 60_000)
    with pytest.raises(UserError) as e:
        TokenData(d).check_ids_below(1000)
    assert str(e.value) == _refusal("valid", 60_000, 1000)


def test_only_shards_and_sources_without_the_record_are_scanned(prepared, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(prepared, root)
    _tamper(root / "shard_0", "train", 60_000)  # recorded: not read
    _tamper(root / "whole", "train", 60_001)  # recorded: not read
    _forget_record(root / "shard_1")
    _tamper(root / "shard_1", "valid", 60_002)  # no record: scanned
    for spec in (root / "merged", f"{root / 'whole'}:0.5,{root / 'merged'}:0.5"):
        with pytest.raises(UserError) as e:
            TokenData(spec).check_ids_below(1000)
        assert str(e.value) == _refusal("valid", 60_002, 1000), spec


def test_an_empty_split_has_no_largest_id():
    empty = np.zeros(0, dtype=np.uint16)
    assert Ids([[empty]], [1.0]).max_id() is None
    assert Ids([[empty], [np.array([3, 7], dtype=np.uint16)]], [0.5, 0.5], [None, 5]).max_id() == 5
    shards = [{"max_token_id": {"train": 9, "valid": None}}, {"max_token_id": {"train": 4, "valid": None}}]
    assert largest_ids(shards) == {"train": 9, "valid": None}
