"""GGUF export: every tensor, the architecture's metadata and the tokenizer, read back with the gguf
package's own reader; text split with the declared pre-tokenizer gives the trained tokenizer's ids."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from accel_pretrain.checkpoint import model_from_checkpoint, resolve_checkpoint
from accel_pretrain.errors import run_cli
from accel_pretrain.export import export, main as export_main
from accel_pretrain.hf import to_hf_state_dict
from accel_pretrain.to_gguf import PRE_TOKENIZERS, llama_permute
from tests.test_bad_input import one_line_error

TEXTS = ["The cat sat on the mat.", "  leading spaces and\n\nnewlines\r\n", "émigré café 1234567 don't", "x"]


def read(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    return reader, fields


def unpermute(t: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_permute: back to HF's layout."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def test_trained_run_to_gguf_round_trips_weights_vocab_merges_and_splitting(tmp_path, trained_run):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer

    out = export(str(trained_run), str(tmp_path / "model.gguf"), fmt="gguf")
    reader, f = read(out)
    model = model_from_checkpoint(resolve_checkpoint(trained_run))
    cfg = model.config
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == cfg.num_hidden_layers
    assert f["llama.embedding_length"] == cfg.hidden_size and f["llama.attention.head_count_kv"] == cfg.num_key_value_heads
    assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta) and f["llama.context_length"] == 2048
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"

    tensors = {t.name: np.array(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    state = to_hf_state_dict(model.state_dict())
    assert "output.weight" not in tensors  # tied: llama.cpp uses token_embd
    assert len(tensors) == len(state) - 1
    for key, value in state.items():
        if key == "lm_head.weight":
            continue
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(key)
        if layer is not None:
            part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}[key.split(".", 3)[3].rsplit(".", 1)[0]]
            name = f"blk.{layer}.{part}.weight"
        got = tensors[name]
        if name.endswith("attn_q.weight"):
            got = unpermute(got, cfg.num_attention_heads)
        if name.endswith("attn_k.weight"):
            got = unpermute(got, cfg.num_key_value_heads)
        assert np.array_equal(got, value.numpy()), key

    tok = AutoTokenizer.from_pretrained(str(trained_run / "tokenizer"))
    vocab = tok.get_vocab()
    assert f["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    spec = json.loads((trained_run / "tokenizer" / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id

    # What llama.cpp does with the file: split with the declared regex, then byte-level BPE merges.
    rebuilt = Tokenizer(models.BPE({t: i for i, t in enumerate(f["tokenizer.ggml.tokens"])},
                                   [tuple(m.split(" ")) for m in f["tokenizer.ggml.merges"]]))
    rebuilt.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZERS[f["tokenizer.ggml.pre"]]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    rebuilt.decoder = decoders.ByteLevel()
    for text in TEXTS:
        assert rebuilt.encode(text).ids == tok(text, add_special_tokens=False).input_ids, text


@pytest.mark.parametrize("dtype, gguf_type, tol", [("float16", "F16", 1e-3), ("bfloat16", "BF16", 1e-2)])
def test_half_precision_tensors(tmp_path, trained_run, dtype, gguf_type, tol):
    import gguf

    out = export(str(trained_run), str(tmp_path / "m"), dtype=dtype, fmt="gguf")
    assert out.name == "m.gguf"
    reader, _ = read(out)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == gguf_type and kinds["output_norm.weight"] == "F32"
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    values = gguf.quants.dequantize(emb.data, emb.tensor_type).reshape(list(reversed(emb.shape.tolist())))
    want = model_from_checkpoint(resolve_checkpoint(trained_run)).embed_tokens.weight.detach().numpy()
    assert np.abs(values - want).max() < tol


def test_qwen3_family_writes_qwen3_without_permutation(tmp_path, data_dir):
    from tests.helpers import TINY, train

    run = tmp_path / "run"
    assert train("--data", data_dir, "--out", run, *TINY[2:], "--preset", "qwen3-small", "--hidden_size", 64,
                 "--num_hidden_layers", 1, "--head_dim", 32, "--intermediate_size", 96, "--max_steps", 1,
                 "--eval_interval", 1, "--save_interval", 1) == 0
    out = export(str(run), str(tmp_path / "q.gguf"), fmt="gguf")
    reader, f = read(out)
    assert f["general.architecture"] == "qwen3" and f["qwen3.attention.key_length"] == 32
    model = model_from_checkpoint(resolve_checkpoint(run))
    tensors = {t.name: np.array(t.data).reshape(list(reversed(t.shape.tolist()))) for t in reader.tensors}
    assert np.array_equal(tensors["blk.0.attn_q.weight"], model.layers[0].self_attn.q_proj.weight.detach().numpy())
    assert np.array_equal(tensors["blk.0.attn_k_norm.weight"], model.layers[0].self_attn.k_norm.weight.detach().numpy())


def test_llama_permute_is_what_llama_cpp_expects():
    # llama.cpp's `llama` rope rotates adjacent pairs (x0, x1), HF rotates halves (x0, x_{d/2}):
    # after the permutation, row 2i of each head must be HF's row i and row 2i+1 HF's row d/2 + i.
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of size 8
    p = llama_permute(w, 2)
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[4]) and torch.equal(p[2], w[1]) and torch.equal(p[9], w[12])


def test_unknown_pre_tokenizer_is_refused(tmp_path, trained_run, capsys):
    from tests.conftest import build_wordlevel_tokenizer

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "tokenizer")
    build_wordlevel_tokenizer(run / "tokenizer", ["a", "b"])
    assert run_cli(export_main, [str(run), str(tmp_path / "m.gguf"), "--format", "gguf"]) == 2
    one_line_error(capsys, "not BPE")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))
