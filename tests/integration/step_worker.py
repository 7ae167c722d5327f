"""torchrun --nproc-per-node=N tests/integration/step_worker.py RESULTS.json [cases]  (driven by test_step.py)

One optimizer step as the trainer takes it (train.trainer.accumulate_gradients) on chat-like
micro-batches whose loss masks cover answers of different lengths:
- token_weighted_*: global batch 16 split by the world size N as MBS x accumulation x N
  (1 x 16 x 1, 4 x 2 x 2, 2 x 2 x 4); loss and every gradient equal the full-batch loss of
  plain PyTorch in one model (cross entropy / KL summed over the mask / the global token count);
- sync_*: the gradient collectives of a step with 4 accumulated micro-batches are those of a
  step with one (synchronized once per step), counted by the profiler;
- accumulation_weights_*: 3 AdamW steps with 4 accumulated micro-batches per rank leave the same
  weights as 3 steps with one micro-batch of 4.
"""

from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from collectives import count_collectives  # same folder
from parallel_worker import clean, fresh_model, full, optim_cfg, parallel_cfg
from train.data.sampler import MicroBatchSampler
from train.distill.loss import distill_loss
from train.losses import language_model_loss
from train.config import DistillConfig
from train.models import init_weights
from train.optim import build_optimizer
from train.parallel import ParallelLayout, build_mesh, parallelize
from train.trainer import accumulate_gradients
from worker_cases import cases_of, run_cases

GLOBAL_BATCH, SEQ_LEN = 16, 24
SPLITS = {1: (1, 16), 2: (4, 2), 4: (2, 2)}  # world size -> (micro-batch size, accumulation)
DISTILL = DistillConfig(temperature=2.0, lm_loss_weight=0.5, chunk_size=20)


def chat_batch(vocab: int, step: int = 0):
    """(GLOBAL_BATCH, SEQ_LEN) inputs, targets and a loss mask on each sequence's answer only: a
    prompt of 2-17 tokens, then an answer of 0-18 tokens (sequence 3 has none), then padding."""
    generator = torch.Generator().manual_seed(300 + step)
    tokens = torch.randint(0, vocab, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    prompt = torch.randint(2, 18, (GLOBAL_BATCH,), generator=generator)
    answer = torch.randint(1, 19, (GLOBAL_BATCH,), generator=generator)
    answer[3] = 0
    position = torch.arange(SEQ_LEN)
    mask = ((position >= prompt[:, None]) & (position < (prompt + answer)[:, None])).float()
    return tokens[:, :-1], tokens[:, 1:], mask


def micro_batches(batch, micro_batch_size: int, dp_rank: int, dp: int) -> list:
    """This rank's micro-batches of the global batch, in the trainer's order (MicroBatchSampler)."""
    sampler = MicroBatchSampler(GLOBAL_BATCH, 0, micro_batch_size, dp_rank, dp)
    return [tuple(tensor[indices] for tensor in batch) for indices in sampler]


def lm_reference(model, batch) -> torch.Tensor:
    """Plain PyTorch on the whole batch: cross entropy summed over the mask / its token count."""
    inputs, targets, mask = batch
    logits = model(inputs).float().flatten(0, 1)
    labels = targets.flatten().masked_fill(mask.flatten() == 0, -100)
    return F.cross_entropy(logits, labels, reduction="sum") / mask.sum()


def kd_reference(model, teacher, batch) -> torch.Tensor:
    """Plain PyTorch: T^2 KL(teacher || student) + w x CE, each summed over the mask / its token count."""
    inputs, targets, mask = batch
    temperature = DISTILL.temperature
    student = F.log_softmax(model(inputs).float() / temperature, -1).flatten(0, 1)
    with torch.no_grad():
        target = F.log_softmax(teacher(inputs).float() / temperature, -1).flatten(0, 1)
    kl = F.kl_div(student, target, log_target=True, reduction="none").sum(-1)
    lm = lm_reference(model, batch)
    return temperature**2 * (kl * mask.flatten()).sum() / mask.sum() + DISTILL.lm_loss_weight * lm


def layout_and_model(name: str, strategy: str):
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = build_mesh(world, 1) if world > 1 else None
    model = parallelize(fresh_model(name), parallel_cfg(data_parallel=strategy), mesh, "cpu")
    return ParallelLayout(world, rank, 1, 1, "cpu", mesh), model


def assert_token_weighted(strategy: str, distill: bool) -> None:
    name = "debug-llama3"  # untied lm_head: its gradient comes from the fused loss alone
    reference = fresh_model(name)
    layout, model = layout_and_model(name, strategy)
    batch = chat_batch(reference.args.vocab_size)
    if distill:
        teacher = init_weights(fresh_model(name), 99).requires_grad_(False)
        reference_loss = kd_reference(reference, teacher, batch)

        def loss_fn(student, inputs, targets, mask, tokens=None):
            return distill_loss(student, teacher, inputs, targets, mask, DISTILL, tokens=tokens)
    else:
        reference_loss, loss_fn = lm_reference(reference, batch), language_model_loss
    reference_loss.backward()
    micro_batch_size, accumulation = SPLITS[layout.world_size]
    mine = micro_batches(batch, micro_batch_size, layout.dp_rank, layout.dp_size)
    assert len(mine) == accumulation
    loss, _ = accumulate_gradients(model, loss_fn, mine, layout, "fp32")
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # the logged loss, as Trainer.train_step reduces it
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-5, atol=1e-6)
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(full(p.grad), reference_grads[clean(n)], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"grad {n}: {m}")


def case_token_weighted_ddp():
    assert_token_weighted("ddp", distill=False)


def case_token_weighted_fsdp():
    assert_token_weighted("fsdp", distill=False)


def case_token_weighted_kd_fsdp():
    assert_token_weighted("fsdp", distill=True)


def gradient_collectives(strategy: str, accumulation: int, every: bool = False) -> tuple[int, int]:
    """(calls, bytes) of the gradient all-reduces (gloo's reduce-scatter too) of one step of
    `accumulation` micro-batches of 1 sequence, the token count's all-reduce left out."""
    layout, model = layout_and_model("debug-qwen3", strategy)
    batch = chat_batch(fresh_model("debug-qwen3").args.vocab_size)
    mine = micro_batches(batch, 1, layout.dp_rank, layout.dp_size)[:accumulation]
    counts = count_collectives(lambda: accumulate_gradients(model, language_model_loss, mine, layout, "fp32",
                                                            sync_every_micro_batch=every))
    count_bytes = 8  # loss_tokens: one float64 scalar
    return counts["all_reduce"].calls - 1, counts["all_reduce"].bytes - count_bytes


def assert_synchronized_once(strategy: str) -> None:
    once = gradient_collectives(strategy, 1)
    assert once[0] > 0, "no gradient collective seen"
    accumulated = gradient_collectives(strategy, 4)
    assert accumulated == once, f"4 micro-batches: {accumulated} (calls, bytes), 1 micro-batch: {once}"


def case_sync_ddp():
    assert_synchronized_once("ddp")


def case_sync_fsdp_zero2():
    assert_synchronized_once("fsdp_zero2")


def case_sync_fsdp_every_micro_batch():
    """DP_SHARDING=fsdp (ZeRO-3) keeps its gradients sharded: one reduce-scatter per micro-batch."""
    once = gradient_collectives("fsdp", 1, every=True)
    accumulated = gradient_collectives("fsdp", 4, every=True)
    # calls 4x; bytes 4x up to a few scalars (FSDP2's per-backward bookkeeping)
    assert once[0] > 0 and accumulated[0] == 4 * once[0], (accumulated, once)
    assert abs(accumulated[1] - 4 * once[1]) <= 64, (accumulated, once)


def assert_accumulation_keeps_weights(strategy: str) -> None:
    """3 steps of 4 sequences per rank: 4 micro-batches of 1, or 1 of 4."""
    name, results = "debug-qwen3", []
    for micro_batch_size in (1, 4):
        layout, model = layout_and_model(name, strategy)
        optimizer = build_optimizer(model, optim_cfg())
        for step in range(3):
            batch = tuple(tensor[:4 * layout.dp_size] for tensor in chat_batch(model_vocab(model), step))
            sampler = MicroBatchSampler(4 * layout.dp_size, 0, micro_batch_size, layout.dp_rank, layout.dp_size)
            mine = [tuple(tensor[indices] for tensor in batch) for indices in sampler]
            accumulate_gradients(model, language_model_loss, mine, layout, "fp32")
            optimizer.step(), optimizer.zero_grad()
        results.append({clean(n): full(p.detach()) for n, p in model.named_parameters()})
    # rounding: the fused loss multiplies only the answer rows, so MBS 1 and 4 round differently
    # (1.7e-6 seen); a wrong accumulation moves a weight by ~lr = 1e-2
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)


def model_vocab(model) -> int:
    return getattr(model, "module", model).args.vocab_size


def case_accumulation_weights_ddp():
    assert_accumulation_keeps_weights("ddp")


def case_accumulation_weights_fsdp():
    assert_accumulation_keeps_weights("fsdp")


if __name__ == "__main__":
    run_cases(cases_of(globals()))
