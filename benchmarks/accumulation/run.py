"""Gradient synchronization per micro-batch vs once per step: `python benchmarks/accumulation/run.py`.

2 and 4 CPU processes (torchrun, gloo), DDP and FSDP2, gradient accumulation 8 micro-batches
of 1 x 64 tokens, tiny-llama3 (1.3M parameters, fp32). Two ways to run the same step:
- before: every micro-batch's backward reduces the gradients (each micro-batch goes through
  train.trainer.accumulate_gradients alone: what the trainer did before gradient_sync);
- after: train.trainer.accumulate_gradients over the 8 micro-batches: DDP no_sync / FSDP2
  set_requires_gradient_sync(False) on the first 7, one reduction in the last backward.
Median step seconds (forward, backward, AdamW step; rank 0, after a barrier) over --steps steps
following one untimed step, the two modes alternating; bytes and calls of every gloo collective
of one step on rank 0 (torch profiler, tests/integration/collectives.py; gloo runs FSDP2's
reduce-scatter as an all-reduce of the whole gradient). Prints a Markdown table.
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

ACCUMULATION, SEQ_LEN, MODEL = 8, 64, "tiny-llama3"


def worker(result_path: str, steps: int) -> None:
    import torch
    import torch.distributed as dist

    from collectives import count_collectives
    from parallel_worker import fresh_model, optim_cfg, parallel_cfg
    from train.losses import language_model_loss
    from train.optim import build_optimizer
    from train.parallel import ParallelLayout, build_mesh, parallelize
    from train.trainer import accumulate_gradients

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(world, 1)
    layout = ParallelLayout(world, rank, 1, 1, "cpu", mesh)
    generator = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, 2048, (ACCUMULATION, 1, SEQ_LEN + 1), generator=generator)
    micro_batches = [(t[:, :-1], t[:, 1:], torch.ones(1, SEQ_LEN)) for t in tokens]
    results = {}
    for strategy in ("ddp", "fsdp"):
        model = parallelize(fresh_model(MODEL), parallel_cfg(data_parallel=strategy), mesh, "cpu")
        optimizer = build_optimizer(model, optim_cfg())

        def step(mode: str) -> None:
            if mode == "before":
                for micro_batch in micro_batches:
                    accumulate_gradients(model, language_model_loss, [micro_batch], layout, "fp32")
            else:
                accumulate_gradients(model, language_model_loss, micro_batches, layout, "fp32")
            optimizer.step(), optimizer.zero_grad()

        seconds = {"before": [], "after": []}
        for mode in seconds:
            step(mode)  # untimed: AdamW state, first-call costs
        for _ in range(steps):
            for mode in seconds:
                dist.barrier()
                start = time.perf_counter()
                step(mode)
                dist.barrier()
                seconds[mode].append(time.perf_counter() - start)
        for mode in seconds:
            counts = count_collectives(lambda: step(mode))
            results[f"{strategy} {mode}"] = {
                "step_s": statistics.median(seconds[mode]),
                "calls": sum(c.calls for c in counts.values()),
                "bytes": sum(c.bytes for c in counts.values()),
                "gradient_bytes": counts["all_reduce"].bytes}
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run(processes: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={processes}", __file__, "--worker", str(result), "--steps", str(steps)],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--processes", default="2,4")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.steps)
    print(f"{MODEL}, accumulation {ACCUMULATION} x MBS 1 x {SEQ_LEN} tokens, fp32, gloo, "
          f"median of {args.steps} steps, rank 0\n")
    print("| processes | strategy | sync | step s | collectives / step | MB / step | gradient-reduction MB / step |")
    print("|---|---|---|---|---|---|---|")
    for processes in (int(p) for p in args.processes.split(",")):
        for name, r in run(processes, args.steps).items():
            strategy, mode = name.split()
            sync = "every micro-batch (before)" if mode == "before" else "once per step (after)"
            print(f"| {processes} | {strategy} | {sync} | {r['step_s']:.3f} | {r['calls']} | {r['bytes'] / 1e6:.1f} | "
                  f"{r['gradient_bytes'] / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
