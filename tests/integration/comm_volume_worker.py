"""torchrun --nproc-per-node=N tests/integration/comm_volume_worker.py RESULT.json MODEL SEQ ACCUMULATION STEPS [TP EP STRATEGIES]

Bytes each rank sends in one optimizer step, as the trainer takes it (train.trainer.accumulate_gradients
and AdamW), for DP_SHARDING ddp, fsdp and fsdp_zero2 (STRATEGIES, comma-separated; default all
three) under TP_SIZE=TP and EP_SIZE=EP (default 1) on gloo: the `wchar` of /proc/self/io, which
counts every byte the process writes, gloo's sockets included (nothing else writes during a step),
between two barriers. Then the median seconds of STEPS steps. Rank 0 writes
{strategy: {"sent_bytes": [per rank], "step_s": s}} to RESULT.json (tests/integration/test_comm_volume.py,
benchmarks/scaling/run.py compare them with the plan of train/launch/comms.py).
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from parallel_worker import fresh_model, optim_cfg, parallel_cfg  # same folder
from train.launch.comms import RING_FACTOR, StepShape, step_collectives
from train.losses import language_model_loss
from train.models.registry import get_model_args
from train.optim import build_optimizer
from train.parallel import ParallelLayout, build_mesh, parallelize
from train.trainer import accumulate_gradients

STRATEGIES = ("ddp", "fsdp", "fsdp_zero2")


def sent_bytes() -> int:
    """Bytes this process wrote so far (write, writev, send: gloo's TCP transport included)."""
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("wchar:"))


def planned_gloo_bytes(model_name: str, seq_len: int, accumulation: int, strategy: str, processes: int,
                       tp: int = 1, ep: int = 1) -> float:
    """The plan's bytes per rank for one step of `accumulation` micro-batches of 1 x seq_len, fp32,
    gloo's reduce-scatter counted as the all-reduce of the whole gradient that gloo runs instead."""
    shape = StepShape(tp=tp, ep=ep, dp=processes // tp, strategy=strategy, tokens=seq_len, accumulation=accumulation,
                      param_bytes=4, act_bytes=4, gather_bytes=4, checkpointing=False)
    total = 0.0
    for collective in step_collectives(get_model_args(model_name), shape):
        kind = "all_reduce" if collective.kind == "reduce_scatter" else collective.kind
        total += collective.times * collective.payload_bytes * RING_FACTOR[kind](collective.ranks)
    return total


def measure(strategy: str, model_name: str, seq_len: int, accumulation: int, steps: int, tp: int, ep: int) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(world, tp, ep=ep)
    layout = ParallelLayout(world, rank, tp, ep, "cpu", mesh)
    cfg = parallel_cfg(data_parallel=strategy, tensor_parallel_size=tp, expert_parallel_size=ep)
    model = parallelize(fresh_model(model_name), cfg, mesh, "cpu")
    optimizer = build_optimizer(model, optim_cfg())
    vocab = fresh_model(model_name).args.vocab_size
    seed = rank // tp  # the TP ranks of a data-parallel rank read the same tokens
    tokens = torch.randint(0, vocab, (accumulation, 1, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    micro_batches = [(t[:, :-1], t[:, 1:], torch.ones(1, seq_len)) for t in tokens]

    def step() -> None:
        accumulate_gradients(model, language_model_loss, micro_batches, layout, "fp32",
                             sync_every_micro_batch=strategy == "fsdp")  # as train/trainer.py
        optimizer.step()
        optimizer.zero_grad()

    step()  # untimed: AdamW state, FSDP2's lazy init
    dist.barrier()
    before = sent_bytes()
    step()
    sent = sent_bytes() - before
    dist.barrier()
    seconds = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        seconds.append(time.perf_counter() - start)
    every_rank = [None] * world
    dist.all_gather_object(every_rank, sent)
    return {"sent_bytes": every_rank, "step_s": statistics.median(seconds)}


def main() -> None:
    result_path, model_name, seq_len, accumulation, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    tp, ep = map(int, sys.argv[6:8]) if len(sys.argv) > 6 else (1, 1)
    strategies = sys.argv[8].split(",") if len(sys.argv) > 8 else STRATEGIES
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    results = {strategy: measure(strategy, model_name, seq_len, accumulation, steps, tp, ep) for strategy in strategies}
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
