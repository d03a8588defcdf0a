"""FSDP2 checkpoints on CPU ranks, FULL_STATE_DICT against SHARDED_STATE_DICT (the baseline is FULL,
rank 0 gathering and writing everything): the seconds of a save and each rank's RSS growth during it.

    python benchmarks/checkpoint_bench.py --data DIR [--preset gpt2-124m] [--processes 2] [--repeats 3]

Each kind runs accel_pretrain.train under accelerate_configs/fsdp.yaml (made to run on CPU processes
as tests/fsdp_on_cpu.py does) for --repeats steps, saving at every step; each rank times its
Accelerator.save_state and samples its RSS every 10 ms while it runs. Seconds: the median over the
saves of the slowest rank; RSS growth: the largest over the saves (the first, before the allocator
has memory to reuse)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(out: str, argv: list[str]) -> None:
    """Inside each rank: time every save and sample this process's RSS while it runs."""
    import psutil
    from accelerate import Accelerator

    from accel_pretrain import launch, train
    from tests.fsdp_on_cpu import promote_cpu_ranks_to_fsdp

    launch.refuse_fsdp_on_cpu = promote_cpu_ranks_to_fsdp
    save_state, saves, me = Accelerator.save_state, [], psutil.Process()

    def measured(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        before, peak, done = me.memory_info().rss, [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.01):
                peak[0] = max(peak[0], me.memory_info().rss)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t = time.perf_counter()
        result = save_state(self, *args, **kwargs)
        seconds = time.perf_counter() - t
        done.set()
        sampler.join()
        saves.append({"seconds": seconds, "rss_growth": max(peak[0], me.memory_info().rss) - before})
        with open(f"{out}.rank{os.environ.get('RANK', '0')}", "w") as f:
            json.dump(saves, f)
        return result

    Accelerator.save_state = measured
    launch.leave(train.main(argv))


def config(tmp: Path, kind: str, processes: int) -> Path:
    path = tmp / f"{kind}.yaml"
    path.write_text((ROOT / "accelerate_configs" / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true")
                    .replace("num_processes: 8", f"num_processes: {processes}").replace("gpu_ids: all\n", "")
                    .replace("fsdp_state_dict_type: SHARDED_STATE_DICT", f"fsdp_state_dict_type: {kind}"))
    return path


def main() -> None:
    from _common import machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
            out = Path(tmp) / kind
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(config(Path(tmp), kind, args.processes)), str(Path(__file__).resolve()), "--worker", str(out),
                   "--data", args.data, "--out", str(Path(tmp) / f"run_{kind}"), "--preset", args.preset,
                   "--block_size", "64", "--micro_batch_size", "1", "--max_steps", str(args.repeats),
                   "--save_interval", "1", "--eval_interval", "1000", "--keep_checkpoints", "1",
                   "--mixed_precision", "bf16"]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            if proc.returncode:
                raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
            ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(args.processes)]
            results[kind] = {"seconds": statistics.median(max(r[i]["seconds"] for r in ranks)
                                                          for i in range(args.repeats)),
                             "rss": [max(s["rss_growth"] for s in r) / 2 ** 20 for r in ranks]}
    print(f"{args.preset}, FSDP2 on {args.processes} CPU processes (gloo), bf16, weights + AdamW state, "
          f"{machine()}")
    for kind, r in results.items():
        print(f"{kind:20s} save {r['seconds']:.2f} s (median of {args.repeats}, slowest rank) | largest RSS growth "
              f"during a save: " + ", ".join(f"rank {i} {mib:.0f} MiB" for i, mib in enumerate(r["rss"])))
    full, sharded = results["FULL_STATE_DICT"], results["SHARDED_STATE_DICT"]
    print(f"ratio FULL / SHARDED: time {full['seconds'] / sharded['seconds']:.2f}, rank 0's RSS growth "
          f"{full['rss'][0] / max(sharded['rss'][0], 1e-9):.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
    else:
        main()
