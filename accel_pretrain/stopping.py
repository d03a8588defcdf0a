"""When a run stops before max_steps: a signal (SIGTERM from SLURM or torchrun, Ctrl-C) or the
job's time running out, agreed by every rank so that all save the same step."""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

import numpy as np
import torch

from .errors import UserError


class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop checkpoints at the end of the current step and exits.
    The previous handlers come back when the run ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self) -> "StopRequest":
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True


class StopVote:
    """Whether any rank was asked to stop, agreed by all ranks without waiting for the device.

    Each step, every rank adds its flag to an all-reduce over a gloo group of its own: one integer
    in host memory, summed by gloo's thread while the step's kernels run, never queued behind them
    on a GPU stream. The sum is read one step later, when it is long done: no host-device sync,
    whatever the world size. All ranks read the same vote at the same step, so all stop and save
    the same step (one step after the signal). One process needs no vote: its flag is the answer."""

    def __init__(self, world: int) -> None:
        import torch.distributed as dist

        self.group = dist.new_group(backend="gloo") if world > 1 else None
        self.pending: tuple[Any, np.ndarray] | None = None

    def __call__(self, flag: bool) -> bool:
        """Cast this step's flag; True when the vote cast a step ago had a rank asking to stop."""
        if self.group is None:
            return flag
        import torch.distributed as dist

        agreed = self.result()
        votes = np.array([int(flag)], dtype=np.int64)
        self.pending = (dist.all_reduce(torch.from_numpy(votes), group=self.group, async_op=True), votes)
        return agreed

    def result(self) -> bool:
        """Wait for the vote in flight (if any) and read it from host memory."""
        if self.pending is None:
            return False
        work, votes = self.pending
        work.wait()
        self.pending = None
        return bool(votes[0])


def parse_duration(text: str) -> float:
    """Seconds in '3600', '90m', '23:55:00', '1-12:00:00' (SLURM's days-hours:minutes:seconds)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d\d):(\d\d)", text.strip())
    if m:
        days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise UserError(f"time_limit must be seconds, a number with s/m/h/d, or [D-]HH:MM:SS (got {text!r})")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


class Deadline:
    """The job's end: --time_limit after this process started, or SLURM's end time of the job
    (SLURM_JOB_END_TIME, a Unix time), whichever comes first. `due` says when the steps and a save
    still to come would not fit in what is left: the slowest recent step twice (the stop is agreed a
    step later), the last save's duration twice (before the first save: the state's bytes at 200 MB/s),
    and 30 s for the launcher's teardown. So a time-limited job stops on its own, saved, and never
    depends on a signal arriving early enough."""

    SLACK_S, WRITE_BYTES_PER_S = 30.0, 200e6

    def __init__(self, time_limit: str | None, state_bytes: int, start: float | None = None) -> None:
        ends = []
        if time_limit:
            ends.append((start or time.time()) + parse_duration(time_limit))
        if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
            ends.append(float(os.environ["SLURM_JOB_END_TIME"]))
        self.end = min(ends) if ends else None
        self.save_s = state_bytes / self.WRITE_BYTES_PER_S
        self.steps: list[float] = []
        self.last = time.monotonic()
        self.reached = False

    def step_done(self) -> None:
        now = time.monotonic()
        self.steps = (self.steps + [now - self.last])[-8:]
        self.last = now

    def saved(self, seconds: float) -> None:
        """A save's duration; the step that saved also counts it (and its eval) in its own time."""
        self.save_s = seconds

    def due(self) -> bool:
        """Once due, always due: the save that follows may be quicker than estimated and shrink the
        margin, but the decision (and the stop message that names it) stands."""
        if self.end is None:
            return False
        need = 2 * max(self.steps, default=0.0) + 2 * self.save_s + self.SLACK_S
        self.reached = self.reached or time.time() + need >= self.end
        return self.reached
