"""accel_pretrain.train on a filesystem whose checkpoint saves take SLOW_SAVE_S seconds longer (every
rank waits before it writes), as a large save to a network filesystem does. Run under accelerate
launch as `python -m tests.slow_save TRAIN-ARGS`."""
from __future__ import annotations

import os
import sys
import time

from accelerate import Accelerator

from accel_pretrain import launch, train

save_state = Accelerator.save_state


def slow_save_state(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    time.sleep(float(os.environ.get("SLOW_SAVE_S", "0")))
    return save_state(self, *args, **kwargs)


Accelerator.save_state = slow_save_state

if __name__ == "__main__":
    launch.leave(train.main(sys.argv[1:]))
