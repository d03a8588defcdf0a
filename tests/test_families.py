"""The open checkpoints people start from (Llama 3.x RoPE scaling, Mistral, Qwen2/2.5, Qwen3), as small
random models built and saved with transformers: import, logits, export back, loss, cached decoding."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from accel_pretrain.data import Ids
from accel_pretrain.evaluate import score
from accel_pretrain.generate import generate
from accel_pretrain.hf import from_hf_config, from_hf_pretrained, to_hf_config, to_hf_model, to_hf_state_dict
from accel_pretrain.model import rope_inv_freq
from tests.helpers import TINY, train

V = 512
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
FAMILIES = {
    "llama3": ("llama", dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 16}, tie_word_embeddings=True)),
    "llama-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
    "mistral": ("mistral", dict(sliding_window=None, head_dim=24, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2.5-yarn": ("qwen2", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 16})),
    "qwen3": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
}


def random_hf_model(name: str):
    """A transformers model of the family with every weight random, biases and norms included, so
    that a dropped or misplaced tensor changes the logits."""
    model_type, extra = FAMILIES[name]
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **extra)).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif pname.endswith("bias"):
                p.normal_(0, 0.5)
    return hf


@pytest.fixture(params=list(FAMILIES))
def saved(request, tmp_path):
    hf = random_hf_model(request.param)
    hf.save_pretrained(tmp_path / request.param)
    return request.param, hf, tmp_path / request.param


def test_rope_inv_freq_equals_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("llama3", "llama-linear", "qwen2.5-yarn"):
        hf = random_hf_model(name)
        ours = from_hf_config(hf.config)
        kind = hf.config.rope_parameters["rope_type"]
        want, want_scale = ROPE_INIT_FUNCTIONS[kind](hf.config, None)
        got, scale = rope_inv_freq(ours)
        assert torch.equal(got, want) and scale == want_scale, name


def test_import_logits_export_loss_and_decoding_match_transformers(saved):
    name, hf, folder = saved
    ours = from_hf_pretrained(str(folder)).eval()
    assert ours.config.model_type == FAMILIES[name][0]
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max().item() < 1e-5

    back = to_hf_state_dict(ours.state_dict())
    original = hf.state_dict()
    assert set(back) == set(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())
    again = to_hf_model(ours)
    assert type(again) is type(hf)
    with torch.no_grad():
        assert torch.equal(again(x).logits, hf(x).logits)

    ids = np.random.default_rng(0).integers(0, V, 300).astype(np.uint16)
    loss_sum, count = score(ours, Ids([[ids]], [1.0]), 32, 4, None, torch.device("cpu"))
    windows = torch.from_numpy(np.stack([ids[s:s + 33] for s in range(0, 300 - 32, 32)]).astype(np.int64))
    with torch.no_grad():
        logits = hf(windows[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, V), windows[:, 1:].reshape(-1)).item()
    assert abs(loss_sum.item() / count.item() - want) < 1e-5

    prompt = torch.randint(0, V, (1, 5))
    mine = generate(ours, prompt, 12, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(mine, theirs)


def test_config_round_trip_keeps_the_family(saved):
    name, hf, folder = saved
    ours = from_hf_pretrained(str(folder))
    cfg = to_hf_config(ours.config)
    assert cfg.model_type == hf.config.model_type and cfg.architectures == hf.config.architectures
    assert cfg.rope_parameters == hf.config.rope_parameters
    assert getattr(cfg, "head_dim", None) == getattr(hf.config, "head_dim", None)


def test_run_from_qwen2_exports_qwen2_that_transformers_loads(tmp_path, data_dir):
    from transformers import pipeline

    from accel_pretrain.export import export

    from tests.conftest import make_documents
    from tokenization.prepare import main as prepare

    from transformers import GenerationConfig

    hf = random_hf_model("qwen2")
    hf.config.pad_token_id = 2
    hf.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, do_sample=False)
    src = tmp_path / "qwen2"
    hf.save_pretrained(src)
    AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")).save_pretrained(src)
    # in a qwen2 folder AutoTokenizer loads those files as Qwen2Tokenizer (Qwen2's split regex and NFC): other
    # ids than data_dir's, so --init_from refuses data_dir; data prepared from the folder itself is accepted
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400, seed=3)), encoding="utf-8")
    data = tmp_path / "data"
    assert prepare([str(corpus), "--tokenizer", str(src), "--out", str(data)]) == 0
    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY[2:], "--init_from", src, "--max_steps", 2) == 2
    assert train("--data", data, "--out", run, *TINY[2:], "--init_from", src, "--max_steps", 2,
                 "--eval_interval", 2, "--save_interval", 2) == 0
    out = export(str(run), str(tmp_path / "hf"))
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 2  # the original's, as its decoding:
    kept = json.loads((out / "generation_config.json").read_text())
    assert kept["do_sample"] is False and "temperature" not in kept and kept["pad_token_id"] == 2
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert all(p.abs().sum() > 0 for n, p in loaded.named_parameters() if n.endswith("bias"))
    text = pipeline("text-generation", model=str(out), max_new_tokens=4)("the cat")[0]["generated_text"]
    assert text.startswith("the cat")


def test_qwen3_preset_trains_and_exports_qwen3(tmp_path, data_dir):
    from accel_pretrain.export import export

    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY[2:], "--preset", "qwen3-small", "--hidden_size", 64,
                 "--num_hidden_layers", 1, "--head_dim", 32, "--intermediate_size", 96, "--max_steps", 2,
                 "--eval_interval", 2, "--save_interval", 2) == 0
    out = export(str(run), str(tmp_path / "hf"))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "Qwen3ForCausalLM" and loaded.config.head_dim == 32


def test_init_from_a_run_of_ours_starts_from_its_weights_with_a_baseline(tmp_path, data_dir, trained_run, capsys):
    """Stage 2 of a run: --init_from a run directory (or one checkpoint) of ours loads its weights
    alone, on the data given with the same tokenizer; the baseline at step 0 (on by default with
    --init_from) is the source run's own last validation loss, and plot draws it as the first point."""
    from accel_pretrain import plot
    from accel_pretrain.checkpoint import list_checkpoints
    from accel_pretrain.tracking import read_log

    source = read_log(trained_run / "train_log.jsonl")
    stage2 = tmp_path / "stage2"
    from tests.helpers import TASKS_DIR

    assert train("--data", data_dir, "--out", stage2, *TINY[2:], "--init_from", trained_run, "--max_steps", 2,
                 "--eval_interval", 2, "--save_interval", 2, "--lr", "1e-4", "--eval_iters", 2, "--eval_tasks",
                 "hellaswag_local", "--eval_tasks_limit", 6, "--eval_tasks_dir", TASKS_DIR) == 0
    out = capsys.readouterr().out
    assert "step 0: val_loss" in out and "step 0: hellaswag_local" in out, out
    log = read_log(stage2 / "train_log.jsonl")
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert [r["step"] for r in log if "tasks/hellaswag_local/acc" in r] == [0, 2]  # before and after, in one log
    assert evals[0]["val_loss"] == [r for r in source if "val_loss" in r][-1]["val_loss"]  # same weights, windows
    first = next(r for r in log if "loss" in r)
    assert first["step"] == 1 and first["lr"] < 1e-4  # a fresh warmup, not the source's schedule
    assert plot.main([str(stage2), "--out", str(tmp_path / "p.png")]) == 0

    ckpt = list_checkpoints(trained_run)[-1]
    again = tmp_path / "from_ckpt"
    tiny = TINY[2:]
    no_lr = tiny[:tiny.index("--lr")] + tiny[tiny.index("--lr") + 2:]
    assert train("--data", data_dir, "--out", again, *no_lr, "--init_from", ckpt, "--max_steps", 1,
                 "--eval_at_start", "false") == 0
    assert "note: --init_from with the from-scratch peak lr 0.0006" in capsys.readouterr().out
    assert train("--out", again, "--resume", "--max_steps", 2) == 0
    assert f"resuming from {again / 'checkpoints' / 'step_0000001'}: loading the model" in capsys.readouterr().out
    assert not [r for r in read_log(again / "train_log.jsonl") if r.get("step") == 0 and "val_loss" in r]
