"""The scaling plan against a real CPU step: `python benchmarks/scaling/run.py`.

2 and 4 CPU processes (torchrun, gloo, one thread each), one optimizer step of 4 accumulated
micro-batches of 1 x 512 tokens in fp32, through tests/integration/comm_volume_worker.py: DDP,
FSDP2 (fsdp) and fsdp_zero2 of tiny-llama3 (1.3M parameters), TP 2 of it on 2 processes and
TP 2 x FSDP2 2 on 4, EP 2 of tiny-qwen3-moe (8 experts, top-2) with DDP on 2:
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

SEQ_LEN, ACCUMULATION = 512, 4
DP_STRATEGIES = ("ddp", "fsdp", "fsdp_zero2")
# (processes, model, TP, EP, strategies)
CASES = [(2, "tiny-llama3", 1, 1, DP_STRATEGIES), (4, "tiny-llama3", 1, 1, DP_STRATEGIES),
         (2, "tiny-llama3", 2, 1, ("ddp",)), (4, "tiny-llama3", 2, 1, ("fsdp",)),
         (2, "tiny-qwen3-moe", 1, 2, ("ddp",))]


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


def measured(case: tuple, steps: int) -> dict:
    processes, model, tp, ep, strategies = case
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                        str(REPO / "tests" / "integration" / "comm_volume_worker.py"), str(result), model,
                        str(SEQ_LEN), str(ACCUMULATION), str(steps), str(tp), str(ep), ",".join(strategies)],
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
    wanted = set(map(int, args.processes.split(",")))
    runs = {case: measured(case, args.steps) for case in CASES if case[0] in wanted}
    print(f"{ACCUMULATION} micro-batches of 1 x {SEQ_LEN} tokens a step, fp32, gloo; "
          f"CPU peak (one thread, fp32 matmul): {peak / 1e9:.1f} GFLOP/s; os.cpu_count() {os.cpu_count()}\n")
    print("| processes | model | layout | planned MB/rank (NCCL ring) | planned MB/rank (gloo) "
          "| sent MB/rank, mean (min-max) | sent / planned |")
    print("|---|---|---|---|---|---|---|")
    for (processes, model, tp, ep, _), results in runs.items():
        for strategy, result in results.items():
            shape = StepShape(tp, ep, processes // tp, strategy, SEQ_LEN, ACCUMULATION, 4, 4, 4, False)
            ring = sum(c.bytes_per_rank for c in step_collectives(get_model_args(model), shape))
            gloo = planned_gloo_bytes(model, SEQ_LEN, ACCUMULATION, strategy, processes, tp=tp, ep=ep)
            sent = result["sent_bytes"]
            mean = statistics.mean(sent)
            print(f"| {processes} | {model} | {layout(tp, ep, processes, strategy)} | {ring / 1e6:.2f} | "
                  f"{gloo / 1e6:.2f} | {mean / 1e6:.2f} ({min(sent) / 1e6:.2f}-{max(sent) / 1e6:.2f}) | {mean / gloo:.3f} |")
    print("\n| processes | model | layout | measured step s | planned compute s at MFU 1 | planned / measured (MFU) |")
    print("|---|---|---|---|---|---|")
    for (processes, model, tp, ep, _), results in runs.items():
        compute = flops_per_token(get_model_args(model), SEQ_LEN) * SEQ_LEN * ACCUMULATION / tp / peak
        for strategy, result in results.items():
            print(f"| {processes} | {model} | {layout(tp, ep, processes, strategy)} | {result['step_s']:.3f} | "
                  f"{compute:.3f} | {compute / result['step_s']:.2f} |")


def layout(tp: int, ep: int, processes: int, strategy: str) -> str:
    """"fsdp", "TP 2", "TP 2 x fsdp 2", "EP 2 (ddp 2)": what splits the model."""
    dp = processes // tp
    if ep > 1:
        return f"EP {ep} ({strategy} {dp})"
    if tp > 1:
        return f"TP {tp}" + (f" x {strategy} {dp}" if dp > 1 else "")
    return strategy

if __name__ == "__main__":
    main()
