"""torchrun --nproc-per-node=2 tests/integration/distill_worker.py RESULTS.json [cases]  (driven by test_distill_parallel.py)

The chunked KD loss (train.distill.loss.distill_loss) on a parallelized student: every rank
takes its share of the global batch; the averaged loss, every gradient and the weights after
AdamW steps equal a single-device student that sees the whole batch. The teacher is a
plain single-device model on every rank. Rank 0 writes {case: "ok" | traceback}.
"""

import torch
import torch.distributed as dist

from parallel_worker import (assert_step_matches, assert_weights_match, fresh_model, optim_cfg,  # same folder
                             parallel_cfg)
from train.config import DistillConfig
from train.distill.loss import distill_loss
from train.models import init_weights
from train.optim import build_optimizer
from train.parallel import build_mesh, parallelize, parallelize_frozen
from worker_cases import cases_of, run_cases

GLOBAL_BATCH, SEQ_LEN = 4, 16
DISTILL = DistillConfig(temperature=2.0, lm_loss_weight=0.5, chunk_size=24)  # chunks cross sequences


def batch(vocab: int, step: int):
    g = torch.Generator().manual_seed(200 + step)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ_LEN + 1), generator=g)
    mask = torch.ones(GLOBAL_BATCH, SEQ_LEN)
    mask[:, :3] = 0  # the same count per sequence: the mean of rank means is the global mean
    return tokens[:, :-1], tokens[:, 1:], mask


def distill_and_compare(name: str, cfg, expect_chunked: bool, steps: int = 2) -> None:
    world, rank = dist.get_world_size(), dist.get_rank()
    teacher = init_weights(fresh_model(name), 99).requires_grad_(False)
    reference = fresh_model(name)
    reference_optimizer = build_optimizer(reference, optim_cfg())
    model = parallelize(fresh_model(name), cfg, build_mesh(world, cfg.tensor_parallel_size), "cpu")
    # the job's teacher: laid out like the student (FSDP2-sharded under fsdp, TP-split under TP)
    parallel_teacher = parallelize_frozen(init_weights(fresh_model(name), 99).requires_grad_(False), cfg,
                                          build_mesh(world, cfg.tensor_parallel_size))
    optimizer = build_optimizer(model, optim_cfg())
    dp, dp_rank = world // cfg.tensor_parallel_size, rank // cfg.tensor_parallel_size
    share = GLOBAL_BATCH // dp
    for step in range(steps):
        inputs, targets, mask = batch(reference.args.vocab_size, step)
        reference_loss, _ = distill_loss(reference, teacher, inputs, targets, mask, DISTILL)
        reference_loss.backward()
        mine = slice(dp_rank * share, (dp_rank + 1) * share)
        loss, _ = distill_loss(model, parallel_teacher, inputs[mine], targets[mine], mask[mine], DISTILL)
        chunked = loss.grad_fn.name().startswith("ChunkedDistillLoss")
        assert chunked == expect_chunked, f"chunked path used: {chunked}, expected {expect_chunked}"
        loss.backward()
        assert_step_matches(model, reference, loss, reference_loss, step)
        reference_optimizer.step(), reference_optimizer.zero_grad()
        optimizer.step(), optimizer.zero_grad()
    assert_weights_match(model, reference)


def case_ddp():  # untied lm_head
    distill_and_compare("debug-llama3", parallel_cfg(data_parallel="ddp"), expect_chunked=True)


def case_fsdp():  # FSDP2, tied embeddings: the root's lm_head weight is unsharded after forward
    distill_and_compare("debug-qwen3", parallel_cfg(data_parallel="fsdp"), expect_chunked=True)


def case_tp():  # vocab-sharded lm_head: the full-logits fallback
    distill_and_compare("debug-qwen3", parallel_cfg(tensor_parallel_size=2), expect_chunked=False)


if __name__ == "__main__":
    run_cases(cases_of(globals()))
