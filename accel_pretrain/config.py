"""One source of truth for configuration: dataclasses, filled from a preset, a YAML file and
command-line overrides, in that order. The resolved result is written into every run directory."""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from .errors import UserError


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its one-line description, which `train --help` prints."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Architecture. Field names are Hugging Face LlamaConfig's, so the mapping is one-to-one."""

    vocab_size: int = opt(8192, "tokens in the vocabulary; always taken from the data's meta.json")
    hidden_size: int = opt(512, "width of the residual stream")
    num_hidden_layers: int = opt(8, "transformer blocks")
    num_attention_heads: int = opt(8, "query heads; must divide hidden_size")
    num_key_value_heads: int = opt(8, "key/value heads (grouped-query attention); must divide the query heads")
    intermediate_size: int = opt(1408, "width of the SwiGLU MLP")
    max_position_embeddings: int = opt(2048, "longest sequence the model is meant for (>= block_size)")
    rope_theta: float = opt(10000.0, "RoPE base frequency")
    rms_norm_eps: float = opt(1e-5, "epsilon of RMSNorm")
    tie_word_embeddings: bool = opt(True, "share the input embedding and the LM head")
    initializer_range: float = opt(0.02, "standard deviation of the initial weights")
    head_dim: int | None = opt(None, "size of each attention head (default hidden_size / num_attention_heads)")
    rope_scaling: dict | None = opt(None, "RoPE scaling as in HF rope_parameters: rope_type linear, llama3 or yarn "
                                          "with its factor etc.")
    qkv_bias: bool = opt(False, "biases on the q/k/v projections (Qwen2)")
    qk_norm: bool = opt(False, "RMSNorm on each head's queries and keys before RoPE (Qwen3)")
    model_type: str = opt("llama", "family written by export: llama, mistral, qwen2 or qwen3")
    sliding_window: int | None = opt(None, "kept for export; attention is full, so it must cover the context")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise UserError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                            f"({self.hidden_size}), or set head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                            f"({self.num_attention_heads})")
        if self.head_size % 2:
            raise UserError(f"head size {self.head_size} must be even for RoPE")
        family = FAMILIES.get(self.model_type)
        if family is None:
            raise UserError(f"model_type {self.model_type!r} is not one of {', '.join(FAMILIES)}")
        if (self.qkv_bias, self.qk_norm) != family:
            raise UserError(f"model_type {self.model_type} has qkv_bias={family[0]} and qk_norm={family[1]}; "
                            "those flags come with the family")
        if self.rope_scaling and self.rope_scaling.get("rope_type") not in ROPE_TYPES:
            raise UserError(f"rope_scaling type {self.rope_scaling.get('rope_type')!r} is not one of "
                            f"{', '.join(ROPE_TYPES)}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.initializer_range <= 0:
            raise UserError("rope_theta, rms_norm_eps and initializer_range must be positive")


# (qkv_bias, qk_norm) of each family that export can write: one model.py, flags for the differences.
FAMILIES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False), "qwen3": (False, True)}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")

# Named presets: each a few lines. vocab_size always comes from the data's meta.json.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=704),
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1408),
    "gpt2-124m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                      intermediate_size=2048),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                 intermediate_size=2816),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, rope_theta=500000.0),
    # Qwen3's layout: QK-norm, grouped-query attention, head_dim decoupled from hidden_size / heads.
    "qwen3-small": dict(model_type="qwen3", qk_norm=True, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=128, intermediate_size=1536, rope_theta=1000000.0),
    "qwen2-small": dict(model_type="qwen2", qkv_bias=True, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=1408, rope_theta=1000000.0),
}

# Parameters with the 8,192-token vocabulary that prepare trains by default.
PRESET_SIZES = {"tiny": "1.0M", "mini": "5.3M", "small": "29.9M", "gpt2-124m": "91M", "350m": "317M", "1b": "990M",
                "qwen3-small": "35.7M", "qwen2-small": "27.8M"}

@dataclass
class TrainConfig:
    """Everything a training run needs besides the architecture."""

    data: str = opt("data", "prepared data directory, or a mixture DIR:WEIGHT,DIR:WEIGHT")
    out: str = opt("runs/default", "run directory: config.json, train_log.jsonl, checkpoints/")
    preset: str | None = opt(None, "model shape, see presets below")
    max_steps: int = opt(1000, "optimizer steps in the whole run (raise it with --resume to extend a run)")
    micro_batch_size: int = opt(8, "windows per forward pass on each process")
    block_size: int = opt(256, "tokens per window (context length)")
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(6e-4, "peak learning rate, reached after warmup")
    min_lr: float | None = opt(None, "learning rate at the end of the schedule (default lr / 10)")
    warmup_steps: int = opt(100, "steps of linear warmup")
    lr_schedule: str = opt("cosine", "after warmup: cosine to min_lr, or wsd (constant, then a final decay)")
    decay_fraction: float = opt(0.2, "wsd: the share of max_steps spent decaying at the end")
    decay_shape: str = opt("linear", "wsd: linear or 1-sqrt decay to min_lr")
    decay_start: int | None = opt(None, "wsd: the step the decay starts (default: the last decay_fraction of "
                                        "max_steps; with --time_limit, set when the time left comes to that fraction "
                                        "of the run's, so the run ends decayed)")
    optimizer: str = opt("adamw", "adamw, or muon: Muon for the matrices inside the blocks, AdamW for the rest")
    weight_decay: float = opt(0.1, "AdamW weight decay (not applied to norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: no clipping; the norm is still logged)")
    eval_interval: int = opt(200, "steps between validation losses")
    eval_iters: int = opt(20, "micro-batches of validation windows per evaluation")
    save_interval: int = opt(500, "steps between checkpoints")
    eval_tasks: str | None = opt(None, "comma-separated lm-eval tasks (e.g. hellaswag,arc_easy) scored during training, "
                                       "each time right after a checkpoint is saved; needs the [eval] extra")
    eval_tasks_limit: int | None = opt(500, "documents of each --eval_tasks task scored (0: all)")
    eval_tasks_interval: int | None = opt(None, "steps between --eval_tasks scores (default: save_interval; such a "
                                                "step also saves)")
    eval_tasks_dir: str | None = opt(None, "a folder of task YAMLs of your own for --eval_tasks (e.g. on local data)")
    eval_at_start: bool | None = opt(None, "log validation loss and --eval_tasks at step 0, before the first update: "
                                           "the baseline of a continued pretraining (default: on with --init_from)")
    keep_checkpoints: int = opt(3, "checkpoints kept; older ones are deleted")
    log_interval: int = opt(10, "steps between lines in train_log.jsonl (and printed lines when not on a terminal)")
    seed: int = opt(1337, "seed of the initial weights and of the training windows")
    resume: str | None = opt(None, "continue the run in --out from its latest checkpoint, or from a checkpoint path; "
                                   "'auto': continue if there is a checkpoint, else start (for requeued jobs)")
    init_from: str | None = opt(None, "start from the weights of a Hugging Face model (Llama, Mistral, Qwen2, Qwen3; "
                                      "folder or hub name) or of a run or checkpoint of ours, with a fresh optimizer "
                                      "and schedule on --data")
    report_to: str = opt("none", "trackers: none, wandb, tensorboard or all")
    project_name: str = opt("accel-pretrain", "tracker project name")
    mixed_precision: str | None = opt(None, "no (fp32), bf16, fp16 or auto (bf16 where the hardware has it natively); "
                                             "default: the launch config's bf16 or fp16, else auto on CPU, fp32 on GPU")
    compile: bool = opt(False, "torch.compile the model")
    activation_checkpointing: bool = opt(False, "keep only each block's input for the backward and recompute the "
                                                "rest (about a third more compute, a fraction of the memory)")
    document_masking: bool = opt(False, "attend only within each document of a window (documents end at EOS)")
    peak_flops: float | None = opt(None, "peak FLOP/s per device for MFU (default: looked up for known GPUs)")
    time_limit: str | None = opt(None, "wall-clock limit of this job (3600, 90m, 23:55:00, 1-00:00:00): save and stop "
                                       "before it, as before SLURM's end of the job (SLURM_JOB_END_TIME)")
    overwrite: bool = opt(False, "replace an existing run in --out")
    model: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        positive = ("max_steps", "micro_batch_size", "block_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "save_interval", "keep_checkpoints", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"lr must be a positive number (got {self.lr})")
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"min_lr must be between 0 and lr={self.lr} (got {self.min_lr})")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0 or (self.decay_start or 0) < 0:
            raise UserError("warmup_steps, weight_decay, grad_clip and decay_start must not be negative")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise UserError("beta1 and beta2 must be in [0, 1)")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise UserError(f"{name} must be {' or '.join(allowed)} (got {value!r}){did_you_mean(value, allowed)}")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        if (self.eval_tasks_interval is not None and self.eval_tasks_interval < 1) or (self.eval_tasks_limit or 0) < 0:
            raise UserError("eval_tasks_interval must be at least 1 and eval_tasks_limit at least 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise UserError("peak_flops must be positive")
        if self.block_size > self.model.max_position_embeddings:
            raise UserError(f"block_size {self.block_size} exceeds max_position_embeddings "
                            f"{self.model.max_position_embeddings}; raise --max_position_embeddings")
        self.model.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    given: ClassVar[set[str]] = set()  # the keys set on the command line or in --config (resolve fills it)
    carried: ClassVar[set[str]] = set()  # the keys a resume took from the run's config.json and nobody gave


# The values an enum-like field takes; a wrong one is refused with the closest.
CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd"), "decay_shape": ("linear", "1-sqrt"),
    "report_to": ("none", "wandb", "tensorboard", "all"), "mixed_precision": ("no", "bf16", "fp16", "auto"),
}


def did_you_mean(value: str, choices: typing.Iterable[str], prefix: str = "") -> str:
    """'; did you mean --max_steps?' for the closest choice (case ignored), or ''."""
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lower), n=1, cutoff=0.6)
    return f"; did you mean {prefix}{lower[close[0]]}?" if close else ""


def auto_precision() -> str:
    """bf16 where the hardware computes it natively; emulated bf16 on a CPU without AVX-512 BF16 or
    AMX is several times slower than fp32, so such CPUs get fp32."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "no"


def resolve_precision(requested: str | None) -> tuple[str, str]:
    """The precision a run uses and why, for the banner: --mixed_precision first, then the launch
    config's bf16 or fp16, then auto on a CPU (fp32 where bf16 is emulated, ~20x slower) and fp32 on a
    GPU, as its launch config says. `accelerate launch` passes a config's 'no' exactly as it passes a
    missing key, so on a CPU fp32 is asked for with --mixed_precision no."""
    import torch

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if requested not in (None, "auto"):
        return requested, "--mixed_precision"
    if requested is None and launcher != "no":
        return launcher, "the launch config"
    if requested is None and torch.cuda.is_available():
        return "no", "the launch config; --mixed_precision auto would pick " + auto_precision()
    chosen = auto_precision()
    if torch.cuda.is_available():
        why = "bf16 on this GPU" if chosen == "bf16" else "this GPU has no bf16"
    else:
        why = "native bf16 on this CPU" if chosen == "bf16" else "this CPU has no native bf16"
    return chosen, f"auto: {why}"


MODEL_FIELDS = {f.name: f for f in fields(ModelConfig)}
TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig) if f.name != "model"}


def _base_type(tp: Any) -> type:
    """int for `int`, str for `str | None`: the type a value must be converted to."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


_HINTS = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainConfig)}


def _convert(name: str, value: Any) -> Any:
    """Coerce a YAML or CLI value to the field's type, or fail with a line naming the field."""
    hint = _HINTS[name]
    optional = type(None) in typing.get_args(hint)
    tp = _base_type(hint)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise UserError(f"{name} cannot be empty")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be {tp.__name__} (got {value!r})") from None


def _read_file(path: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config file {path}{where}: not valid YAML ({what})") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of field: value")
    flat = {k: v for k, v in data.items() if k != "model"}
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise UserError(f"config file {path}: 'model' must be a mapping")
    for k, v in model.items():
        if k not in MODEL_FIELDS:
            raise UserError(f"config file {path}: unknown model field {k!r}{did_you_mean(k, MODEL_FIELDS)}")
        flat[k] = v
    if isinstance(flat.get("data"), list):  # a mixture: [DIR:WEIGHT, ...] or [{path: DIR, weight: W}, ...]
        items = [f"{d['path']}:{d.get('weight', 1)}" if isinstance(d, dict) and "path" in d else str(d)
                 for d in flat["data"]]
        flat["data"] = ",".join(items)
    return flat


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """`--field value`, `--field=value`, and a bare `--flag` for booleans and resume."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options look like --field value")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in TRAIN_FIELDS and key not in MODEL_FIELDS and key != "config":
            hint = did_you_mean(key, [*TRAIN_FIELDS, *MODEL_FIELDS, "config"], prefix="--")
            raise UserError(f"unknown option --{key}{hint or '; see --help for the fields'}")
        if not eq:
            nxt = args[i + 1] if i + 1 < len(args) else None
            takes_flag = key in ("resume", "overwrite", "compile", "tie_word_embeddings", "document_masking",
                                 "activation_checkpointing", "eval_at_start")
            if nxt is None or (nxt.startswith("--") and takes_flag):
                if not takes_flag:
                    raise UserError(f"--{key} needs a value")
                value = "latest" if key == "resume" else "true"
            else:
                value, i = nxt, i + 1
        out[key] = value
        i += 1
    return out


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """A config.json (or to_dict()) as one level of field: value, model fields included."""
    return {**{k: v for k, v in config.items() if k != "model"}, **config.get("model", {})}


NOT_CARRIED = ("resume", "overwrite", "time_limit")  # what a resumed run never takes over (time_limit: this job's)


def run_config(values: dict[str, Any]) -> dict[str, Any]:
    """For --resume: the fields of the run being continued, read from RUN/config.json."""
    resume = str(values.get("resume"))
    run = Path(values["out"]) if "out" in values else None
    if resume not in ("latest", "auto"):  # a checkpoint (or run) path: the run it belongs to
        run = Path(resume).parent.parent if Path(resume).parent.name == "checkpoints" else Path(resume)
    if run is None:
        raise UserError("--resume needs --out RUN: the run directory to continue")
    path = run / "config.json"
    if not path.is_file() and resume == "auto":
        return {}
    if not path.is_file():
        raise UserError(f"--resume: {run} holds no run (no config.json); check --out, or start a run there")
    try:
        saved = flatten(json.loads(path.read_text()))
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"--resume: {path} is not a readable config ({e})") from None
    return {k: v for k, v in saved.items() if (k in TRAIN_FIELDS or k in MODEL_FIELDS) and k not in NOT_CARRIED}


def resolve(args: list[str]) -> TrainConfig:
    """preset < YAML file < command line; with --resume the run's own config.json comes first.
    Unknown keys and wrong types are user errors. The keys the user gave are kept in cfg.given."""
    cli = parse_overrides(args)
    given: dict[str, Any] = _read_file(cli.pop("config")) if "config" in cli else {}
    given.update(cli)
    for key in given:
        if key not in TRAIN_FIELDS and key not in MODEL_FIELDS:
            raise UserError(f"unknown config key {key!r}{did_you_mean(key, [*TRAIN_FIELDS, *MODEL_FIELDS])}")
    saved = run_config(given) if given.get("resume") else {}
    values = saved | given
    cfg = TrainConfig()
    preset = _convert("preset", given.get("preset"))
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}{did_you_mean(preset, PRESETS)}")
        cfg.model = dataclasses.replace(cfg.model, **PRESETS[preset])
        values = {k: v for k, v in values.items() if k not in PRESETS[preset] or k in given}
    for key, value in values.items():
        target = cfg.model if key in MODEL_FIELDS else cfg
        setattr(target, key, _convert(key, value))
    cfg.given, cfg.carried = set(given), set(saved) - set(given)
    return cfg


def changes(before: dict[str, Any], after: TrainConfig) -> list[str]:
    """'lr 0.002 -> 0.001' for every field that differs between a run's config and the new one."""
    now = flatten(after.to_dict())
    return [f"{k} {before.get(k)} -> {v}" for k, v in now.items()
            if k not in NOT_CARRIED and k in before and before[k] != v]


def help_text() -> str:
    def line(f: dataclasses.Field) -> str:
        default = "" if f.default is None else f" (default {f.default!r})"
        return f"  --{f.name:<28} {f.metadata['help']}{default}"

    lines = ["", f"  --{'config FILE.yaml':<28} fields as YAML (model fields flat or under `model:`); the command line wins",
             "training fields (--field value):"]
    lines += [line(f) for f in fields(TrainConfig) if f.name != "model"]
    lines.append("model fields (override the preset):")
    lines += [line(f) for f in fields(ModelConfig)]
    lines.append(f"presets: {', '.join(f'{k} ({v})' for k, v in PRESET_SIZES.items())}")
    return "\n".join(lines)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return ModelConfig(**{k: v for k, v in d.items() if k in MODEL_FIELDS})


def save_json(obj: Any, path: Path) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
