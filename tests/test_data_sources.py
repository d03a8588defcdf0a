"""Training over shard directories and mixtures of data directories: windows from every shard,
the mixture's weights on every rank, exact resume, and refusal of sources of another tokenizer."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from accel_pretrain.data import TokenData, parse_data_spec
from tests.conftest import build_wordlevel_tokenizer, make_documents
from tests.helpers import TINY, train, weights
from tokenization.merge import main as merge_main
from tokenization.prepare import main as prepare_main


@pytest.fixture(scope="module")
def sources(tmp_path_factory, data_dir):
    """Two shards merged into one directory, and a second directory, all of data_dir's tokenizer."""
    root = tmp_path_factory.mktemp("sources")
    tok = str(data_dir / "tokenizer")
    files = []
    for i in range(4):
        f = root / f"part{i}.jsonl"
        f.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(100, seed=10 + i)),
                     encoding="utf-8")
        files.append(str(f))
    for i in range(2):
        assert prepare_main([*files, "--tokenizer", tok, "--out", str(root / f"shard_{i}"), "--num_shards", "2", "--dedup", "none",
                             "--shard_index", str(i)]) == 0
    assert merge_main([str(root / "shard_0"), str(root / "shard_1"), "--out", str(root / "merged")]) == 0
    return root / "merged", data_dir


def _resume_is_exact(tmp_path, data: str) -> None:
    run = tmp_path / "run"
    args = ["--data", data, "--out", run, *TINY, "--max_steps", 6, "--eval_interval", 3, "--save_interval", 3]
    assert train(*args) == 0
    final = weights(run / "checkpoints/step_0000006")
    shutil.rmtree(run / "checkpoints/step_0000006")
    assert train(*args, "--resume") == 0
    resumed = weights(run / "checkpoints/step_0000006")
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    assert json.loads((run / "config.json").read_text())["data"] == data


def test_windows_come_from_every_shard_and_never_cross_one(sources):
    merged, _ = sources
    data = TokenData(merged)
    assert len(data.train.parts) == 2 and len(data.train) == sum(len(p) for p in data.train.parts)
    starts = data.train.random_starts(np.random.default_rng(0), 4000, 32)
    part = np.searchsorted(data.train.offsets, starts, side="right") - 1
    assert set(part.tolist()) == {0, 1}
    assert np.all(starts + 33 <= data.train.offsets[part + 1])
    xy = data.train.windows(starts[:50], 32)
    joined = np.concatenate(data.train.parts)
    assert all(np.array_equal(xy[i].numpy(), joined[s:s + 33]) for i, s in enumerate(starts[:50]))
    ev = data.valid.eval_starts(32)
    assert len(ev) == sum(max(len(p) - 32, 0) // 32 + (max(len(p) - 32, 0) % 32 > 0) for p in data.valid.parts)


def test_train_on_merged_shards_resumes_exactly(tmp_path, sources):
    _resume_is_exact(tmp_path, str(sources[0]))


def test_mixture_weights_hold_on_every_rank_and_resume_exactly(tmp_path, sources):
    merged, single = sources
    spec = f"{merged}:0.7,{single}:0.3"
    assert parse_data_spec(spec) == [(str(merged), pytest.approx(0.7)), (str(single), pytest.approx(0.3))]
    data = TokenData(spec)
    for rank in (0, 1):
        starts = np.concatenate([data.train.random_starts(np.random.default_rng([1, step, rank]), 8, 32)
                                 for step in range(1000)])
        from_merged = np.mean(starts < data.train.offsets[len(data.train.groups[0])])
        assert abs(from_merged - 0.7) < 0.02, (rank, from_merged)
    _resume_is_exact(tmp_path, spec)


def test_sources_of_another_tokenizer_are_refused(tmp_path, sources, capsys):
    merged, _ = sources
    docs = make_documents(60)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    other = build_wordlevel_tokenizer(tmp_path / "wl", " ".join(docs).split(), extra=600)
    assert prepare_main([str(corpus), "--tokenizer", str(other), "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    assert train("--data", f"{merged}:0.5,{tmp_path / 'other'}:0.5", "--out", tmp_path / "run", *TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another tokenizer" in err[0] and not (tmp_path / "run").exists()
