"""accel_pretrain.train under an FSDP launch config on CPU ranks (gloo), through Accelerate's own
FSDP2 path: prepare() applies fully_shard per Block, clip_grad_norm_, save_state and load_state take
their FSDP2 branches. Run as `accelerate launch --config_file CPU_FSDP.yaml -m tests.fsdp_on_cpu ARGS`.

Accelerate picks FSDP only from a GPU-like distributed type (AcceleratorState.__init__ switches to
FSDP from MULTI_GPU, never from MULTI_CPU), so on a CPU it would train plain DDP, which is why train
refuses FSDP there (launch.refuse_fsdp_on_cpu). This replaces that one refusal: the gloo group is set up
as MULTI_CPU, and the state's decision then sees MULTI_GPU and becomes FSDP. Everything else is
train's own code path. With GRADIENT_BYTES=PATH set, each rank records the gradient bytes it holds
after every backward (PATH.rankN); with COMPILE_BACKEND=aot_eager and GRAPHS=PATH, --compile goes
through that backend and each rank writes dynamo's counts (PATH.rankN)."""
from __future__ import annotations

import json
import os
import sys

import torch

from accel_pretrain import launch, train
from tests.helpers import compile_through


def promote_cpu_ranks_to_fsdp() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def held_gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient this rank holds: FSDP2's sharded gradients, and any unsharded one it keeps
    between micro-batches (in the parameter's dtype, or accumulated in the reduce dtype)."""
    total = 0
    for module in model.modules():
        if not hasattr(module, "_get_fsdp_state") or module._get_fsdp_state()._fsdp_param_group is None:
            continue
        for param in module._get_fsdp_state()._fsdp_param_group.fsdp_params:
            held = [param.unsharded_accumulated_grad, getattr(getattr(param, "_unsharded_param", None), "grad", None),
                    param.sharded_param.grad]
            total += sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in held if t is not None)
    return total


def record_gradient_bytes(path: str) -> None:
    """After every backward, this rank's held gradient bytes, written to PATH.rankN at the end."""
    from accelerate import Accelerator

    backward, seen = Accelerator.backward, []

    def counted(self, loss, **kwargs):  # noqa: ANN001, ANN003, ANN202
        backward(self, loss, **kwargs)
        seen.append(held_gradient_bytes(self._models[0]))
        with open(f"{path}.rank{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(seen, f)

    Accelerator.backward = counted


def write_graph_counts(path: str) -> None:
    from torch._dynamo.utils import counters

    with open(f"{path}.rank{os.environ.get('RANK', '0')}", "w") as f:
        json.dump({"graph_breaks": sum(counters["graph_break"].values()),
                   "graphs": counters["stats"]["unique_graphs"]}, f)


launch.refuse_fsdp_on_cpu = promote_cpu_ranks_to_fsdp
if os.environ.get("GRADIENT_BYTES"):
    record_gradient_bytes(os.environ["GRADIENT_BYTES"])
if os.environ.get("COMPILE_BACKEND"):
    compile_through(os.environ["COMPILE_BACKEND"])

if __name__ == "__main__":
    code = train.main(sys.argv[1:])
    if os.environ.get("GRAPHS"):
        write_graph_counts(os.environ["GRAPHS"])
    launch.leave(code)
