"""What a run reports: train_log.jsonl (the contract other tools read), Accelerate trackers
(wandb, tensorboard), a tqdm bar on the main process, and MFU against the device's peak FLOPs."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

# Dense peak FLOP/s per device, (bf16/fp16, tf32/fp32), from the vendors' data sheets. fp32 runs
# on CUDA use TF32 tensor cores (train.start_accelerator), so the second figure is TF32's.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 494e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
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
