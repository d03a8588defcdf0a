"""accel_pretrain.train on an injected clock that runs at another speed on each rank: a step takes
1 + 0.5 x rank seconds of it (stopping.Deadline reads only this clock; process start = its zero).
Run under accelerate launch as `python -m tests.clocked TRAIN-ARGS`."""
from __future__ import annotations

import os
import sys

from accel_pretrain import launch, stopping, train
from tests.helpers import Clock

clock = Clock(1_000_000.0)
step_s = 1.0 + 0.5 * int(os.environ.get("RANK", "0"))
get_batch = train.get_batch


def ticking(run, step):  # noqa: ANN001, ANN202
    clock.now += step_s
    return get_batch(run, step)


stopping.time = clock
train.process_start = lambda: clock.now
train.get_batch = ticking

if __name__ == "__main__":
    launch.leave(train.main(sys.argv[1:]))
