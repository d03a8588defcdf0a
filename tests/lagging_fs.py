"""accel_pretrain.train on a filesystem that lags on every rank but 0: those ranks see no checkpoint
in the run directory at all. Run under accelerate launch as `python -m tests.lagging_fs TRAIN-ARGS`;
a rank that decided where the run starts on its own would start over while rank 0 resumes."""
from __future__ import annotations

import os
import sys

from accel_pretrain import checkpoint, launch, rundir, train

if int(os.environ.get("RANK", "0")) != 0:
    for module in (checkpoint, rundir):
        module.list_checkpoints = lambda run: []

if __name__ == "__main__":
    launch.leave(train.main(sys.argv[1:]))
