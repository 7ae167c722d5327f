"""One training step under torch's MemTracker, against the plan's memory estimate (not a test module).

    torchrun --nproc-per-node=N tests/integration/memory_worker.py JOB OUT.json key=value ...
    python tests/integration/memory_worker.py pretrain out.json model.name=debug-qwen3 ...

Composes configs/<JOB>.yaml with the overrides as the job would, builds the model from the
registry on CPU, applies the job's parallelism (train.parallel.parallelize) and AdamW, then runs
two optimizer steps with the trainer's loss: the first creates AdamW's state, the second runs
under MemTracker (parameters, buffers, gradients, optimizer state and every tensor the step
allocates, by storage). Rank 0 writes {"measured": peak bytes, "planned": the plan's bytes per
GPU without the GPU-only overhead, "categories": ...} to OUT.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist


def main(job: str, out: str, overrides: list[str]) -> None:
    from torch.distributed._tools.mem_tracker import MemTracker

    from train.launch.memory import job_split, job_memory, job_models
    from train.launch.plan import compose_config
    from train.losses import language_model_loss
    from train.models import build_model, init_weights
    from train.optim import build_optimizer
    from train.parallel import build_mesh, parallelize

    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    cfg = compose_config(job, overrides)
    model = build_model(str(cfg.model.name), device="meta")
    model.to_empty(device="cpu")
    init_weights(model, 0)
    mesh = build_mesh(world, cfg.parallel.tensor_parallel_size, "cpu", cfg.parallel.expert_parallel_size)
    model = parallelize(model, cfg.parallel, mesh, "cpu")
    optimizer = build_optimizer(model, cfg.optim)
    mbs, seq = int(cfg.training.micro_batch_size), int(cfg.data.seq_length)
    vocab = getattr(model, "module", model).args.vocab_size
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.training.precision == "bf16")

    def step() -> None:
        tokens = torch.randint(0, vocab, (mbs, seq + 1))
        inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], torch.ones(mbs, seq)
        with autocast:
            loss = language_model_loss(model, inputs, targets, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    categories = {str(kind): float(size) for kind, size in next(iter(peak.values())).items()}
    data_parallel = world // cfg.parallel.tensor_parallel_size
    planned = job_memory(job, cfg, job_split(cfg, data_parallel), job_models(job, cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        result = {"measured": categories["Total"], "planned": planned["total"] - planned["overhead"],
                  "categories": categories, "plan": planned}
        with open(out, "w") as handle:
            json.dump(result, handle)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
