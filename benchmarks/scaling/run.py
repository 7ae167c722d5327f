"""The scaling plan against a real CPU step: `python benchmarks/scaling/run.py`.

2 and 4 CPU processes (torchrun, gloo, one thread each), DDP, FSDP2 (fsdp) and fsdp_zero2, one
optimizer step of 4 accumulated micro-batches of 1 x 512 tokens of tiny-llama3 (1.3M
parameters, fp32), through tests/integration/comm_volume_worker.py:
- bytes: what each rank sent in one step (/proc/self/io wchar: gloo's sockets) against the
  plan's (train/launch/comms.py), the plan's reduce-scatter counted as the all-reduce gloo
  runs instead (NCCL's ring reduce-scatter sends half of that);
- compute: the median step seconds against the plan's compute term, FLOPs per step over the
  processes x the CPU's peak, the peak being a one-thread fp32 matmul measured here (the
  override a GPU's table entry stands for); planned / measured is the MFU the plan would have to
  assume on this CPU. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]  # run from anywhere without installing

MODEL, SEQ_LEN, ACCUMULATION = "tiny-llama3", 512, 4


def matmul_peak(size: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of one thread's fp32 (size x size) @ (size x size): the best of `repeats`."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measured(processes: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                        str(REPO / "tests" / "integration" / "comm_volume_worker.py"), str(result), MODEL,
                        str(SEQ_LEN), str(ACCUMULATION), str(steps)],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", default="2,4")
    args = parser.parse_args()
    from comm_volume_worker import planned_gloo_bytes
    from train.launch.comms import StepShape, step_collectives
    from train.models.registry import flops_per_token, get_model_args

    peak = matmul_peak()
    flops_per_rank = flops_per_token(get_model_args(MODEL), SEQ_LEN) * SEQ_LEN * ACCUMULATION
    runs = {processes: measured(processes, args.steps) for processes in map(int, args.processes.split(","))}
    print(f"{MODEL}, {ACCUMULATION} micro-batches of 1 x {SEQ_LEN} tokens a step, fp32, gloo; "
          f"CPU peak (one thread, fp32 matmul): {peak / 1e9:.1f} GFLOP/s; os.cpu_count() {os.cpu_count()}\n")
    print("| processes | strategy | planned MB/rank (NCCL ring) | planned MB/rank (gloo) | sent MB/rank, mean (min-max) "
          "| sent / planned |")
    print("|---|---|---|---|---|---|")
    for processes, results in runs.items():
        for strategy, result in results.items():
            shape = StepShape(1, 1, processes, strategy, SEQ_LEN, ACCUMULATION, 4, 4, 4, False)
            ring = sum(c.bytes_per_rank for c in step_collectives(get_model_args(MODEL), shape))
            gloo = planned_gloo_bytes(MODEL, SEQ_LEN, ACCUMULATION, strategy, processes)
            sent = result["sent_bytes"]
            mean = statistics.mean(sent)
            print(f"| {processes} | {strategy} | {ring / 1e6:.2f} | {gloo / 1e6:.2f} | {mean / 1e6:.2f} "
                  f"({min(sent) / 1e6:.2f}-{max(sent) / 1e6:.2f}) | {mean / gloo:.3f} |")
    print("\n| processes | strategy | measured step s | planned compute s at MFU 1 | planned / measured (MFU) |")
    print("|---|---|---|---|---|")
    for processes, results in runs.items():
        for strategy, result in results.items():
            compute = flops_per_rank / peak
            print(f"| {processes} | {strategy} | {result['step_s']:.3f} | {compute:.3f} | "
                  f"{compute / result['step_s']:.2f} |")


if __name__ == "__main__":
    main()
