"""When a run stops before max_steps: a signal (SIGTERM from SLURM or torchrun, Ctrl-C) or the
job's time running out, agreed by every rank so that all save the same step."""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Any

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
    """Flags (stop, start the decay) that any rank may raise, agreed by all ranks without waiting for
    the device, over the training's own process group (no second group: nothing to find a network
    interface for, as gloo must on a cluster).

    Each step a rank writes its flags into pinned host memory, copies them to the device without
    blocking, all-reduces them there asynchronously (queued on the device after the step's kernels)
    and copies the sum back into pinned memory on a side stream, marking the copy with an event (the
    compute stream never waits for the vote). The sum is read one step later, when it is long done:
    no host-device sync per step, whatever the world size. Two buffers alternate, so a step never
    writes memory whose copy may still be in flight (the read a step later waited for it). All ranks
    read the same sum at the same step, so all stop (or start decaying) at the same step, one step
    after the first rank asked. One process needs no vote: its flags are the answer."""

    FLAGS = 2

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device = world, device
        pin = device.type == "cuda"
        self.host = [torch.zeros(self.FLAGS, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.back = [torch.zeros(self.FLAGS, dtype=torch.int32, pin_memory=pin) for _ in range(2)]
        self.turn = 0
        self.side = torch.cuda.Stream(device) if device.type == "cuda" and world > 1 else None  # copies votes back
        self.pending: tuple[Any, Any, torch.Tensor] | None = None  # (work, copy-done event, host result)

    def __call__(self, stop: bool, decay: bool = False) -> tuple[bool, bool]:
        """Cast this step's flags; returns the flags of the vote cast a step ago (any rank's)."""
        if self.world == 1:
            return stop, decay
        import torch.distributed as dist

        agreed = self.result()
        host, back = self.host[self.turn], self.back[self.turn]
        self.turn ^= 1
        host.numpy()[:] = (int(stop), int(decay))
        votes = host.to(self.device, non_blocking=True)
        work = dist.all_reduce(votes, async_op=True)
        if self.device.type == "cuda":
            # The copy back waits for the all-reduce on a side stream: the compute stream (the next
            # step's kernels) never waits for the vote, and the host only waits a step later.
            with torch.cuda.stream(self.side):
                work.wait()
                back.copy_(votes, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.side)
            votes.record_stream(self.side)  # the allocator must not reuse it before the side stream has read it
            self.pending = (None, done, back)
        else:
            self.pending = (work, None, votes)
        return agreed

    def result(self) -> tuple[bool, bool]:
        """Wait for the vote in flight (if any; finished long ago) and read it from host memory."""
        if self.pending is None:
            return False, False
        work, done, values = self.pending
        if work is not None:
            work.wait()
        if done is not None:
            done.synchronize()
        self.pending = None
        stop, decay = values.numpy().tolist()
        return stop > 0, decay > 0


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
        self.start = start or time.time()
        self.limit_end = self.start + parse_duration(time_limit) if time_limit else None  # --time_limit's alone
        if self.limit_end is not None:
            ends.append(self.limit_end)
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

    def margin(self) -> float:
        """Seconds a stop needs before the end: two of the slowest recent steps, two saves, the teardown."""
        return 2 * max(self.steps, default=0.0) + 2 * self.save_s + self.SLACK_S

    def decay_due(self, fraction: float, elapsed_before: float) -> bool:
        """--time_limit with a WSD schedule: whether the time left before the stop is down to `fraction`
        of the run's time (the jobs before this one included), when the decay must start for the run
        to end decayed. SLURM's end of a job is not the run's end (a requeued job continues it)."""
        if self.limit_end is None:
            return False
        return self.left() <= fraction * (elapsed_before + self.limit_end - self.start)

    def left(self) -> float:
        """Seconds of --time_limit left for steps before the stop must begin."""
        return self.limit_end - time.time() - self.margin()

    def due(self) -> bool:
        """Once due, always due: the save that follows may be quicker than estimated and shrink the
        margin, but the decision (and the stop message that names it) stands."""
        if self.end is None:
            return False
        self.reached = self.reached or time.time() + self.margin() >= self.end
        return self.reached
