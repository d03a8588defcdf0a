"""accel_pretrain.train under an FSDP launch config on CPU ranks (gloo), through Accelerate's own
FSDP2 path: prepare() applies fully_shard per Block, clip_grad_norm_, save_state and load_state take
their FSDP2 branches. Run as `accelerate launch --config_file CPU_FSDP.yaml -m tests.fsdp_on_cpu ARGS`.

Accelerate picks FSDP only from a GPU-like distributed type (AcceleratorState.__init__ switches to
FSDP from MULTI_GPU, never from MULTI_CPU), so on a CPU it would train plain DDP, which is why train
refuses FSDP there (launch.refuse_fsdp_on_cpu). This replaces that one refusal: the gloo group is set up
as MULTI_CPU, and the state's decision then sees MULTI_GPU and becomes FSDP. Everything else is
train's own code path."""
from __future__ import annotations

import sys

from accel_pretrain import launch, train


def promote_cpu_ranks_to_fsdp() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


launch.refuse_fsdp_on_cpu = promote_cpu_ranks_to_fsdp

if __name__ == "__main__":
    launch.leave(train.main(sys.argv[1:]))
