"""Pipeline parallelism vs data parallelism on 2 processes: `python benchmarks/pipeline/run.py`.

One torchrun of 2 CPU processes (gloo, one thread each), small-qwen3 (11.1M parameters, 8
blocks, fp32), micro-batches of 2 x 128 tokens. For each global batch of m micro-batches:
- DP 2 (DDP): each rank runs m / 2 micro-batches of the whole model (train.trainer
  accumulate_gradients, one all-reduce per step);
- PP 2 (train/parallel/pipeline.py): stage 0 holds the embedding and blocks 0-3, stage 1 blocks
  4-7, the norm and lm_head; the m micro-batches go through Schedule1F1B;
- PP 2 x 2 virtual stages (PP_SCHEDULE=interleaved_1f1b): 4 stages of 2 blocks, rank 0 stages 0
  and 2, rank 1 stages 1 and 3, through ScheduleInterleaved1F1B.
Median step seconds (forward, backward, clipping, AdamW; after a barrier, rank 0) over --steps
steps after one untimed step, the layouts alternating. The pipeline bubble: 1F1B runs m + p - 1
slots for m micro-batches on p stages, so its step is slot x (m + p - 1) and the bubble
(p - 1) / (m + p - 1); interleaved over v stages per rank, slots of 1/v the work, so
(p - 1) / (v m + p - 1). Measured: a least-squares line step(m) = slot x m + idle over the m of the
run, per schedule; the measured bubble at m is idle / step(m), and idle / slot the micro-batch
slots lost per step (1F1B's theory: p - 1 = 1; interleaved's: (p - 1) / v = 0.5). The idle time also holds what a step does once (clipping, the AdamW step, the
loss broadcast, the tied embedding's gradient sum), so it is an upper bound of the bubble.
Prints a Markdown table.
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

MODEL, MBS, SEQ_LEN, STAGES, VIRTUAL = "small-qwen3", 2, 128, 2, 2


def worker(result_path: str, steps: int, micro_batch_counts: list[int]) -> None:
    import torch
    import torch.distributed as dist

    from parallel_worker import fresh_model, optim_cfg, parallel_cfg
    from train.losses import language_model_loss
    from train.optim import build_optimizer
    from train.parallel import ParallelLayout, build_mesh, parallelize
    from train.parallel.pipeline import Pipeline
    from train.trainer import accumulate_gradients, loss_tokens

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    dp_mesh, pp_mesh = build_mesh(world, 1), build_mesh(world, 1, "cpu", 1, STAGES)
    dp_layout = ParallelLayout(world, rank, 1, 1, "cpu", dp_mesh)
    pp_layout = ParallelLayout(world, rank, 1, 1, "cpu", pp_mesh, pp=STAGES)
    dp_model = parallelize(fresh_model(MODEL), parallel_cfg(), dp_mesh, "cpu")
    pp_model = parallelize(fresh_model(MODEL), parallel_cfg(pipeline_parallel_size=STAGES), pp_mesh, "cpu")
    ppv_model = parallelize(fresh_model(MODEL), parallel_cfg(pipeline_parallel_size=STAGES, virtual_stages=VIRTUAL,
                                                             pipeline_schedule="interleaved_1f1b"), pp_mesh, "cpu")
    models = {"dp": dp_model, "pp": pp_model, "ppv": ppv_model}
    optimizers = {layout: build_optimizer(model, optim_cfg()) for layout, model in models.items()}
    vocab = pp_model.args.vocab_size
    results = {}
    for m in micro_batch_counts:
        generator = torch.Generator().manual_seed(m)
        tokens = torch.randint(0, vocab, (m, MBS, SEQ_LEN + 1), generator=generator)  # the same on both ranks
        micro_batches = [(t[:, :-1], t[:, 1:], torch.ones(MBS, SEQ_LEN)) for t in tokens]
        mine = micro_batches[rank::world]  # DP: this rank's m / 2
        pipelines = {"pp": Pipeline(pp_model, pp_layout, m), "ppv": Pipeline(ppv_model, pp_layout, m)}

        def step(layout: str) -> None:
            if layout == "dp":
                accumulate_gradients(dp_model, language_model_loss, mine, dp_layout, "fp32")
                torch.nn.utils.clip_grad_norm_(dp_model.parameters(), 1.0)
            else:
                pipelines[layout].step(micro_batches, loss_tokens(micro_batches, pp_layout), "cpu")
                pipelines[layout].clip_gradients(1.0)
            optimizers[layout].step(), optimizers[layout].zero_grad()

        seconds = {"dp": [], "pp": [], "ppv": []}
        for layout in seconds:
            step(layout)  # untimed: AdamW state, the stage's first-call shape exchange
        for _ in range(steps):
            for layout in seconds:
                dist.barrier()
                start = time.perf_counter()
                step(layout)
                dist.barrier()
                seconds[layout].append(time.perf_counter() - start)
        results[m] = {layout: statistics.median(values) for layout, values in seconds.items()}
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def run(steps: int, micro_batch_counts: list[int]) -> dict[int, dict[str, float]]:
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        __file__, "--worker", str(result), "--steps", str(steps),
                        "--micro-batches", ",".join(map(str, micro_batch_counts))],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        return {int(m): times for m, times in json.loads(result.read_text()).items()}


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = slope x + intercept."""
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return slope, mean_y - slope * mean_x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batches", default="2,4,8,16", help="global batches, in micro-batches")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    counts = [int(m) for m in args.micro_batches.split(",")]
    if args.worker:
        return worker(args.worker, args.steps, counts)
    results = run(args.steps, counts)
    fits = {layout: fit_line([(m, results[m][layout]) for m in counts]) for layout in ("pp", "ppv")}
    (slot, idle), (slot_v, idle_v) = fits["pp"], fits["ppv"]
    print(f"{MODEL}, micro-batches of {MBS} x {SEQ_LEN} tokens, fp32, gloo, 2 processes, median of "
          f"{args.steps} steps, rank 0; fit: 1F1B slot {slot:.4f} s, idle {idle:.4f} s a step = "
          f"{idle / slot:.2f} slots (theory {STAGES - 1}); interleaved slot {slot_v:.4f} s, idle {idle_v:.4f} s = "
          f"{idle_v / slot_v:.2f} slots (theory {(STAGES - 1) / VIRTUAL})\n")
    print("| micro-batches m | DP 2 step s | PP 2 step s | PP / DP | bubble measured | bubble (p-1)/(m+p-1) "
          "| PP 2 x v 2 step s | PPv / DP | bubble measured | bubble (p-1)/(vm+p-1) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in counts:
        dp, pp, ppv = results[m]["dp"], results[m]["pp"], results[m]["ppv"]
        print(f"| {m} | {dp:.3f} | {pp:.3f} | {pp / dp:.2f} | {idle / pp:.0%} | "
              f"{(STAGES - 1) / (m + STAGES - 1):.0%} | {ppv:.3f} | {ppv / dp:.2f} | {idle_v / ppv:.0%} | "
              f"{(STAGES - 1) / (VIRTUAL * m + STAGES - 1):.0%} |", flush=True)


if __name__ == "__main__":
    main()
