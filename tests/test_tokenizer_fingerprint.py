"""meta.json's tokenizer_fingerprint (issue #23): prepare and the checks of evaluate / train --init_from
fingerprint what AutoTokenizer LOADS, not the raw tokenizer.json. In transformers 5 a folder whose
config.json says qwen2 loads its GPT-2 style byte-level BPE files as Qwen2Tokenizer (Qwen2's split regex
and NFC normalizer): data prepared from that very folder must pass, data of the same files loaded
without that config (other ids) must not, and data of older versions (tokenizer_sha256 alone) keeps
passing as before."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from accel_pretrain.data import TokenData, check_same_tokenizer
from accel_pretrain.errors import UserError
from tests.conftest import build_wordlevel_tokenizer, make_documents
from tokenization.prepare import main as prepare

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
# digits and a combining accent: Qwen2's pre-tokenizer splits digits one by one and NFC joins e + U+0301
PROBE = "In 2024 he paid 12345 coins for 678 loaves at the cafe\u0301, HE'S SURE."


def corpus_documents() -> list[str]:
    return [f"{d} In {1900 + i} he paid {i * 137} coins at the cafe\u0301 {i}."
            for i, d in enumerate(make_documents(80))]


def build_gpt2_style_bpe(path: Path) -> Path:
    """A tiny GPT-2 style tokenizer folder: byte-level BPE, ByteLevel pre-tokenizer, no normalizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_documents() + make_documents(200, seed=5), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS).save_pretrained(str(path))
    return path


def add_tiny_qwen2(path: Path, vocab_size: int) -> None:
    """A random 1-layer Qwen2 model in the folder: its config.json says model_type qwen2."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(str(path))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """plain: the GPT-2 style files alone; qwen2: the same files beside a Qwen2 config.json and weights;
    wl: a word-level tokenizer; corpus: the text prepared from each."""
    root = tmp_path_factory.mktemp("fingerprint")
    plain = build_gpt2_style_bpe(root / "plain")
    qwen2 = root / "qwen2"
    shutil.copytree(plain, qwen2)
    from transformers import AutoTokenizer

    add_tiny_qwen2(qwen2, len(AutoTokenizer.from_pretrained(str(plain))))
    docs = corpus_documents()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    wl = build_wordlevel_tokenizer(root / "wl", " ".join(docs).split(), extra=400, eos=EOS)
    return {"plain": plain, "qwen2": qwen2, "wl": wl, "corpus": corpus}


@pytest.fixture(scope="module")
def prepared(folders, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    out = {}
    for name in ("plain", "qwen2", "wl"):
        out[name] = root / name
        assert prepare([str(folders["corpus"]), "--tokenizer", str(folders[name]), "--out", str(out[name]),
                        "--num_proc", "2"]) == 0
    return out


def as_old_version(src: Path, dst: Path) -> Path:
    """The data directory as a version before tokenizer_fingerprint wrote it: tokenizer_sha256 alone."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    del meta["tokenizer_fingerprint"]
    (dst / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return dst


def refused(data: Path, tokenizer: Path) -> bool:
    try:
        check_same_tokenizer(TokenData(data), tokenizer, "the model")
    except UserError as e:
        assert "was prepared with another tokenizer" in str(e)
        return True
    return False


def test_transformers_loads_the_gpt2_files_of_a_qwen2_folder_as_another_tokenizer(folders):
    """The premise: otherwise the tests below prove nothing."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = json.loads(Tokenizer.from_file(str(folders["qwen2"] / "tokenizer.json")).to_str())
    plain = AutoTokenizer.from_pretrained(str(folders["plain"]))
    qwen2 = AutoTokenizer.from_pretrained(str(folders["qwen2"]))
    assert type(qwen2).__name__ == "Qwen2Tokenizer" and type(plain).__name__ != "Qwen2Tokenizer"
    loaded = json.loads(qwen2.backend_tokenizer.to_str())
    assert raw["normalizer"] is None and loaded["normalizer"] == {"type": "NFC"}
    assert raw["pre_tokenizer"]["type"] == "ByteLevel" and loaded["pre_tokenizer"]["type"] == "Sequence"
    assert json.loads(plain.backend_tokenizer.to_str())["pre_tokenizer"] == raw["pre_tokenizer"]
    assert len(plain) == len(qwen2)
    assert plain.encode(PROBE, add_special_tokens=False) != qwen2.encode(PROBE, add_special_tokens=False)


def test_data_prepared_from_a_remapped_folder_passes_against_that_folder(folders, prepared, capsys):
    """The bug: refused before as 'prepared with another tokenizer' (the raw file's sha was compared)."""
    from transformers import AutoTokenizer

    from accel_pretrain import evaluate

    data = prepared["qwen2"]
    meta = json.loads((data / "meta.json").read_text())
    qwen2 = AutoTokenizer.from_pretrained(str(folders["qwen2"]))
    docs = corpus_documents()
    assert meta["train_tokens"] + meta["valid_tokens"] == sum(len(qwen2.encode(d, add_special_tokens=False)) + 1
                                                              for d in docs)  # encoded as loaded, not as raw
    check_same_tokenizer(TokenData(data), folders["qwen2"], "the model")
    check_same_tokenizer(TokenData(data), data / "tokenizer", "the run")  # the run's copy of the data's tokenizer
    capsys.readouterr()
    assert evaluate.main([str(folders["qwen2"]), "--data", str(data), "--block_size", "32", "--max_windows", "4"]) == 0
    assert "loss" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_other_tokenizations_are_refused(folders, prepared):
    """The same files loaded without the Qwen2 config encode otherwise: the raw-file check let that pass."""
    assert refused(prepared["plain"], folders["qwen2"])
    assert refused(prepared["qwen2"], folders["plain"])
    assert refused(prepared["wl"], folders["qwen2"]) and refused(prepared["qwen2"], folders["wl"])
    check_same_tokenizer(TokenData(prepared["plain"]), folders["plain"], "the model")
    check_same_tokenizer(TokenData(prepared["wl"]), folders["wl"], "the model")


def test_meta_records_the_fingerprint_of_the_loaded_tokenizer(folders, prepared):
    from transformers import AutoTokenizer

    from tokenization.tokenizer import legacy_sha256, tokenizer_fingerprint

    for name in ("plain", "qwen2", "wl"):
        meta = json.loads((prepared[name] / "meta.json").read_text())
        tok = AutoTokenizer.from_pretrained(str(folders[name]))
        assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
        assert len(meta["tokenizer_fingerprint"]) == 64 and meta["tokenizer_sha256"] != meta["tokenizer_fingerprint"]
        saved = (prepared[name] / "tokenizer" / "tokenizer.json").read_text()
        assert meta["tokenizer_sha256"] == legacy_sha256(saved)  # the older definition, unchanged
    metas = [json.loads((prepared[n] / "meta.json").read_text()) for n in ("plain", "qwen2", "wl")]
    assert len({m["tokenizer_fingerprint"] for m in metas}) == 3


def test_data_of_older_versions_keeps_passing(folders, prepared, tmp_path):
    old_plain = as_old_version(prepared["plain"], tmp_path / "old_plain")
    old_qwen2 = as_old_version(prepared["qwen2"], tmp_path / "old_qwen2")
    old_wl = as_old_version(prepared["wl"], tmp_path / "old_wl")
    check_same_tokenizer(TokenData(old_plain), folders["plain"], "the model")  # its raw tokenizer.json
    check_same_tokenizer(TokenData(old_wl), folders["wl"], "the model")
    check_same_tokenizer(TokenData(old_qwen2), folders["qwen2"], "the model")  # what the loaded tokenizer recorded
    check_same_tokenizer(TokenData(old_qwen2), old_qwen2 / "tokenizer", "the run")
    # the older rule compared the raw file, which is the same as plain's: kept so as to refuse nothing it let through
    check_same_tokenizer(TokenData(old_plain), folders["qwen2"], "the model")
    assert refused(old_wl, folders["qwen2"]) and refused(old_plain, folders["wl"])
    # old and new data of one tokenizer mix in one run, and merge
    assert TokenData(f"{prepared['plain']}:0.5,{old_plain}:0.5").vocab_size == TokenData(old_plain).vocab_size
    with pytest.raises(UserError, match="another tokenizer"):
        TokenData(f"{prepared['plain']}:0.5,{old_qwen2}:0.5")
    from tokenization.merge import main as merge

    assert merge([str(prepared["plain"]), str(old_plain), "--out", str(tmp_path / "m")]) == 0
    assert "tokenizer_fingerprint" not in json.loads((tmp_path / "m" / "meta.json").read_text())
    assert merge([str(prepared["plain"]), str(prepared["plain"]), "--out", str(tmp_path / "m2")]) == 0
    merged = json.loads((tmp_path / "m2" / "meta.json").read_text())
    assert merged["tokenizer_fingerprint"] == json.loads((prepared["plain"] / "meta.json").read_text())[
        "tokenizer_fingerprint"]
    check_same_tokenizer(TokenData(tmp_path / "m2"), folders["plain"], "the model")
    assert refused(tmp_path / "m2", folders["qwen2"])


def test_a_fingerprint_does_not_depend_on_the_process(folders, prepared):
    """A process with another hash seed than this one (where prepare recorded them) fingerprints
    each folder as prepare did."""
    code = ("import sys; from tokenization.tokenizer import load_tokenizer, tokenizer_fingerprint; "
            "print(*(tokenizer_fingerprint(load_tokenizer(path)) for path in sys.argv[1:]))")
    names = ("plain", "qwen2")
    want = [json.loads((prepared[name] / "meta.json").read_text())["tokenizer_fingerprint"] for name in names]
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # this process: random unless set
    env = {**os.environ, "PYTHONHASHSEED": seed, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *(str(folders[name]) for name in names)],
                         capture_output=True, text=True, cwd=ROOT, env=env, check=True).stdout.splitlines()
    assert out[-1].split() == want


def test_a_tokenizer_without_a_rust_backend_is_fingerprinted(tmp_path, folders):
    """ByT5's tokenizer is Python only (no tokenizer.json): class, vocabulary, added tokens and settings."""
    from transformers import ByT5Tokenizer

    from tokenization.tokenizer import load_tokenizer, tokenizer_fingerprint

    ByT5Tokenizer().save_pretrained(str(tmp_path / "byt5"))
    tok = load_tokenizer(str(tmp_path / "byt5"))
    assert not getattr(tok, "is_fast", False)
    tok.save_pretrained(str(tmp_path / "again"))
    assert tokenizer_fingerprint(load_tokenizer(str(tmp_path / "again"))) == tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(ByT5Tokenizer(extra_ids=10)) != tokenizer_fingerprint(tok)
    docs = [d * 3 for d in make_documents(30)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    assert prepare([str(corpus), "--tokenizer", str(tmp_path / "byt5"), "--out", str(tmp_path / "data"),
                    "--num_proc", "1"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    check_same_tokenizer(TokenData(tmp_path / "data"), tmp_path / "byt5", "the model")
    assert refused(tmp_path / "data", folders["plain"])
    ids = np.load(tmp_path / "data" / "train_ids.npy")
    assert len(ids) == meta["train_tokens"]
