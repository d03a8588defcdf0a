"""Shared fixtures. Nothing here touches the network or ../shared: tests build their own data."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["HF_DATASETS_OFFLINE"] = "1"  # tests read local task data only; online mode costs seconds of retries
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker: OpenMP threads of two workers on two cores
    os.environ["OMP_NUM_THREADS"] = "1"  # would spin against each other (and the launches' processes)
    import torch

    torch.set_num_threads(1)

WORDS = ("the cat sat on a mat while rain fell over old stone houses near river bank and birds "
         "sang songs about summer light winter night quick brown fox jumps lazy dog émigré café").split()


def make_documents(n: int, seed: int = 0, min_words: int = 20, max_words: int = 80) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"Document {i}: " + " ".join(words) + ".")
    return docs


@pytest.fixture
def documents() -> list[str]:
    return make_documents(120)


@pytest.fixture
def jsonl_corpus(tmp_path: Path, documents: list[str]) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return path


def build_wordlevel_tokenizer(path: Path, words: list[str], extra: int = 0, eos: str | None = "</s>") -> Path:
    """A whitespace word-level tokenizer folder, loadable by AutoTokenizer; `extra` pads the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0}
    if eos:
        vocab[eos] = 1
    for w in sorted(set(words)):
        vocab.setdefault(w, len(vocab))
    for i in range(extra):
        vocab[f"filler{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    kwargs = {"eos_token": eos} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs).save_pretrained(str(path))
    return path


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built once per test session, also under pytest-xdist: the first worker to ask builds
    it under a file lock, the others wait and then read the same folder (xdist's documented recipe for
    session fixtures). Tests treat it as read-only; a test that must change it copies it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    path, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data directory (trained byte-level BPE, 512 tokens) shared by the training tests."""
    from tokenization.prepare import main

    def build(root: Path) -> None:
        corpus = root / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400, seed=3)),
                          encoding="utf-8")
        assert main([str(corpus), "--out", str(root / "data"), "--vocab_size", "512"]) == 0

    return built_once(tmp_path_factory, "data", build) / "data"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A finished 6-step tiny run with one checkpoint, shared read-only by the export, evaluate and
    bad-input tests (a test that must change a run copies it)."""
    from tests.helpers import TINY, train

    def build(root: Path) -> None:
        assert train("--data", data_dir, "--out", root / "run", *TINY, "--max_steps", 6, "--eval_interval", 6,
                     "--save_interval", 6) == 0

    return built_once(tmp_path_factory, "trained", build) / "run"


def launched_once(tmp_path_factory, name: str, data_dir: Path, args: list[str]) -> Path:
    """RUN of `accelerate launch --config_file accelerate_configs/cpu_ddp.yaml -m accel_pretrain.train
    --data DATA --out RUN ARGS`, built once per session (built_once)."""
    from tests.helpers import free_port, launch

    def build(root: Path) -> None:
        proc = launch("cpu_ddp.yaml", "--data", data_dir, "--out", root / "run", *args,
                      extra=["--main_process_port", str(free_port())])
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out

    return built_once(tmp_path_factory, name, build) / "run"


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory, data_dir) -> Path:
    """The plain two-rank DDP run (cpu_ddp.yaml, gloo) that the multi-process tests compare with:
    tests.helpers.DDP_RUN's 6 steps, checkpoints at 3 and 6, downstream tasks scored after the step-6
    save. Read by the DDP, task-scoring, FSDP2, SLURM and lagging-filesystem tests."""
    from tests.helpers import DDP_RUN

    return launched_once(tmp_path_factory, "ddp", data_dir, DDP_RUN)


@pytest.fixture(scope="session")
def ddp_muon_run(tmp_path_factory, data_dir) -> Path:
    """Muon in bf16 on two gloo ranks (tests.helpers.DDP_MUON_RUN): its ranks must agree (test_train),
    and FSDP2 must follow it (test_fsdp2)."""
    from tests.helpers import DDP_MUON_RUN

    return launched_once(tmp_path_factory, "ddp_muon", data_dir, DDP_MUON_RUN)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate's process-wide state back to none after each test: lm-eval's HFLM (the parity tests)
    creates an Accelerator of its own, whose fp32 state would refuse a later in-process bf16 run."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# What starts other processes (accelerate launch, torchrun, a CLI or benchmark in a subprocess, the
# launched-once DDP runs): `make test-fast` leaves these out for the edit-test loop; `make test` runs all.
LAUNCHES = ("launch(", "subprocess.", "Popen", "torch.distributed.run", "time_to_loss(", "_slurm_nodes(",
            "start(args", "simulate_elsewhere(", "run(config", "run(cpu_fsdp_config")
LAUNCHED_FIXTURES = {"ddp_run", "ddp_muon_run"}


def pytest_collection_modifyitems(items: list) -> None:
    import inspect

    for item in items:
        source = inspect.getsource(item.function)
        if any(token in source for token in LAUNCHES) or LAUNCHED_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.launches)
