"""What a run reports: train_log.jsonl (the contract other tools read), Accelerate trackers
(wandb, tensorboard), a tqdm bar on the main process, and MFU against the device's peak FLOPs."""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

# Dense peak FLOP/s per device, (bf16/fp16, tf32/fp32), from the vendors' data sheets. fp32 runs
# on CUDA use TF32 tensor cores (launch.start_accelerator), so the second figure is TF32's.
# The first name whose words appear in the device's name wins: variants come before their family.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "B200": (2250e12, 1100e12),
    "H200": (989e12, 494e12),
    "GH200": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "H800 PCIe": (756e12, 378e12),
    "H800": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "A10G": (70e12, 35e12),
    "L4": (121e12, 60e12),
    "RTX 4090": (165e12, 83e12),
    "RTX 3090": (71e12, 36e12),
    "V100": (125e12, 16e12),
    "T4": (65e12, 8e12),
}


def peak_flops(device: torch.device, mixed_precision: str, override: float | None) -> float | None:
    """Per-device peak for MFU: the user's --peak_flops, else the table for a known GPU, else None."""
    if override:
        return override
    if device.type != "cuda":
        return None
    words = re.split(r"[\s\-_]+", torch.cuda.get_device_name(device))  # "NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, ...
    for key, (half, full) in PEAK_FLOPS.items():  # whole words: "NVIDIA L40" is no L4, "H100 PCIe" no H100 SXM
        n = len(key.split())
        if any(words[i:i + n] == key.split() for i in range(len(words))):
            return half if mixed_precision in ("bf16", "fp16") else full
    return None


class RunLog:
    """Appends JSON lines to RUN/train_log.jsonl from the main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps after the checkpoint: that work is being redone."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    """All complete records; a last line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def trackers_for(report_to: str) -> list[str]:
    return {"none": [], "all": ["wandb", "tensorboard"]}.get(report_to, [report_to])


def check_trackers(report_to: str) -> None:
    """Fail before anything is written when a tracker cannot start (no wandb login, no tensorboard)."""
    if report_to in ("wandb", "all") and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled",
                                                                                          "dryrun"):
        try:
            import wandb
        except ImportError:
            raise UserError("--report_to wandb needs the wandb package: pip install wandb") from None
        try:
            wandb.Api(timeout=10)
        except Exception as e:  # wandb raises its own UsageError when no API key is configured
            if "api key" in str(e).lower():
                raise UserError("--report_to wandb needs a login: run `wandb login`, set WANDB_API_KEY, or set "
                                "WANDB_MODE=offline to log locally") from None
        finally:
            wandb.teardown()  # Api() sets up wandb's process-wide state; the run sets it up again itself
    if report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("--report_to tensorboard needs the tensorboard package: pip install tensorboard") from None


class SpikeWatch:
    """Flags a logged training loss far above the median of the recent ones: more than half a nat
    and six median absolute deviations above it (the noise of the recent steps). Once per spike:
    it re-arms when a loss comes back under the line. Costs nothing: the loss is already read."""

    WINDOW, MIN_GAP, MADS = 20, 0.5, 6.0

    def __init__(self, history: list[float]) -> None:
        self.recent = history[-self.WINDOW:]
        self.armed = True

    def check(self, loss: float) -> float | None:
        """The median a spike rose above, or None."""
        spike = None
        if len(self.recent) >= self.WINDOW // 2:
            median = statistics.median(self.recent)
            mad = statistics.median(abs(x - median) for x in self.recent)
            above = loss > median + max(self.MIN_GAP, self.MADS * mad) or not math.isfinite(loss)
            spike = median if above and self.armed else None
            self.armed = not above
        self.recent = (self.recent + [loss])[-self.WINDOW:]
        return spike
