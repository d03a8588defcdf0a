"""Checkpoints: RUN/checkpoints/step_NNNNNNN/ = accelerate state (model.safetensors, optimizer,
scheduler, scaler, RNG) + train_state.json. Written under a temporary name and renamed when
complete, so a name `step_*` always means a complete checkpoint. Loading never unpickles code."""
from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, model_config_from_dict, save_json
from .errors import UserError
from .model import Transformer

STEP_RE = re.compile(r"^step_(\d{7})$")
STATE_FILE = "train_state.json"
WEIGHTS_FILE = "model.safetensors"
FSDP_WEIGHTS_FILE = "pytorch_model_fsdp.bin"
FSDP_SHARDED_DIR = "pytorch_model_fsdp_0"  # Accelerate's SHARDED_STATE_DICT: torch.distributed.checkpoint
WRAPPER_PREFIXES = ("_orig_mod.", "module.")

# Tied embeddings are saved once by design; accelerate warns about it at every save.
logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)


def checkpoint_path(run: Path, step: int) -> Path:
    return Path(run) / "checkpoints" / f"step_{step:07d}"


def checkpoint_step(ckpt: Path) -> int:
    """The optimizer step a checkpoint folder step_NNNNNNN was saved at."""
    return int(STEP_RE.match(Path(ckpt).name)[1])


def list_checkpoints(run: Path) -> list[Path]:
    root = Path(run) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(src: str | Path) -> Path:
    """A checkpoint folder, or the latest complete checkpoint of a run folder."""
    src = Path(src)
    if (src / STATE_FILE).is_file():
        return src
    if src.is_dir():
        found = list_checkpoints(src)
        if found:
            return found[-1]
        raise UserError(f"{src} holds no checkpoint (looked for {src}/checkpoints/step_NNNNNNN/)")
    raise UserError(f"{src}: no such run or checkpoint directory")


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt / STATE_FILE} is unreadable ({e})") from None


def save_checkpoint(accelerator, run: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Earlier checkpoints stay intact if this one fails."""
    final = checkpoint_path(run, step)
    tmp = final.with_name(f".partial-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # before any rank writes its part (FSDP: each rank's RNG state, shards)
    accelerator.wait_for_everyone()
    written: OSError | None = None
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except OSError as e:
        written = e
    accelerator.wait_for_everyone()  # every rank's part (its RNG state, FSDP shards) is in before the rename
    try:
        if written:
            raise written
        if accelerator.is_main_process:
            save_json(state, tmp / STATE_FILE)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final} ({e.strerror or e}); earlier checkpoints are "
                        "intact: free space or fix permissions, then --resume") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in list_checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_shards(folder: Path) -> dict[str, Any]:
    """A torch.distributed.checkpoint folder read whole in this one process: the body of DCP's own
    dcp_to_torch_save without its file (a model's worth of disk, and write access, saved), or that
    converter through a temporary file where the private loader is gone."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    except ImportError:
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(folder, Path(tmp) / "whole.pt")
            return torch.load(Path(tmp) / "whole.pt", map_location="cpu", weights_only=True)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole weights of a checkpoint: ours, FSDP's full state dict, or FSDP's shards (every rank's
    part, read back whole in this one process by torch.distributed.checkpoint's own converter)."""
    from safetensors.torch import load_file

    path, fsdp, sharded = ckpt / WEIGHTS_FILE, ckpt / FSDP_WEIGHTS_FILE, ckpt / FSDP_SHARDED_DIR
    if path.is_file():
        state = load_file(str(path))
    elif fsdp.is_file():  # FSDP with FULL_STATE_DICT saves a torch file; tensors only, no code
        state = torch.load(fsdp, map_location="cpu", weights_only=True)
    elif (sharded / ".metadata").is_file():
        state = read_shards(sharded)["model"]
    else:
        raise UserError(f"{ckpt} has no {WEIGHTS_FILE} (nor {FSDP_WEIGHTS_FILE}, nor {FSDP_SHARDED_DIR}/)")
    for prefix in WRAPPER_PREFIXES:
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return state


def model_from_checkpoint(ckpt: Path) -> Transformer:
    """Our model with a checkpoint's weights; tied embeddings are restored from the saved copy."""
    cfg: ModelConfig = model_config_from_dict(read_state(ckpt)["model_config"])
    model = Transformer.to_load(cfg)
    state = load_weights(ckpt)
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("embed_tokens.weight"))
        state.setdefault("embed_tokens.weight", state.get("lm_head.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt}: weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def tokenizer_dir_of(ckpt: Path) -> Path | None:
    """The tokenizer a checkpoint's run was trained with (copied into RUN/tokenizer at start)."""
    run_tok = ckpt.parent.parent / "tokenizer"
    return run_tok if run_tok.is_dir() else None


def is_ours(path: Path) -> bool:
    """Whether a folder is a run or a checkpoint of ours (not a Hugging Face model)."""
    return path.is_dir() and any((path / name).exists() for name in (STATE_FILE, "checkpoints", "train_log.jsonl"))


def load_any(source: str) -> tuple[Transformer, str | None, dict[str, Any]]:
    """Our model from a run directory, a checkpoint, or a Hugging Face folder or hub name (Llama, Mistral,
    Qwen2, Qwen3). Returns the model, where its tokenizer is, and what is known about its data."""
    path = Path(source)
    if is_ours(path):
        ckpt = resolve_checkpoint(path)
        tok = tokenizer_dir_of(ckpt)
        return model_from_checkpoint(ckpt), str(tok) if tok else None, read_state(ckpt)
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{source} is neither a run, a checkpoint, nor a Hugging Face model folder")
    from .hf import from_hf_pretrained

    return from_hf_pretrained(source), source, {}
