"""torchrun --nproc-per-node=2 tests/integration/parallel_worker.py RESULTS.json  (driven by test_parallel.py)

Each case builds a debug model twice on every rank: a single-device reference that sees the
whole global batch, and a copy parallelized by train.parallel that sees this rank's share.
Rank 0 writes {case: "ok" | the first failing rank's traceback} to RESULTS.json; the pytest side asserts per case.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.tensor import DTensor, Replicate, Shard

from train.config import ParallelConfig
from train.models import build_model, init_weights
from train.optim import build_optimizer
from train.parallel import (build_mesh, build_zero_redundancy_optimizer, parallelize,
                            zero_redundancy_optimizer_state_dict)
from worker_cases import cases_of, run_cases  # same folder: the shared main()

GLOBAL_BATCH, SEQ_LEN = 4, 16
WRAPPER_NAMES = ("_checkpoint_wrapped_module.", "_orig_mod.")  # inside names; DDP adds "module." in front


def parallel_cfg(**overrides) -> ParallelConfig:
    """The typed cfg.parallel (its defaults: DDP, no TP) with these fields changed."""
    return ParallelConfig(**overrides)


def optim_cfg():
    # eps 1e-4, not 1e-8: with a tiny eps AdamW moves a weight by ~lr whatever the size of its
    # gradient, so rounding noise of the other sign on a near-zero gradient becomes a 2 x lr
    # difference; a larger eps keeps the update a smooth function of the gradient.
    return SimpleNamespace(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-4)


def fresh_model(name: str):
    model = build_model(name, device="cpu")
    return init_weights(model, 1234)


def batch(vocab: int, step: int) -> torch.Tensor:
    """(GLOBAL_BATCH, SEQ_LEN + 1) tokens, the same on every rank."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)


def loss_of(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def clean(name: str) -> str:
    """The reference model's name of a parameter of the wrapped model."""
    for wrapper in WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def assert_step_matches(model, reference, loss, reference_loss, step: int) -> None:
    """After backward: this rank's loss averaged over ranks equals the one-device loss, and every
    gradient (gathered whole) equals the one-device gradient."""
    loss = loss.detach().clone()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    grads = {n: full(p.grad) for n, p in model.named_parameters()}  # all collectives before any assert:
    # a check failing on one rank only must not leave the other waiting in a gather
    torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-5, atol=1e-6)
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[clean(n)], rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=n: f"step {step} grad {n}: {m}")


def assert_weights_match(model, reference) -> None:
    reference_params = dict(reference.named_parameters())
    weights = {n: full(p.detach()) for n, p in model.named_parameters()}  # gathered before any assert
    for n, weight in weights.items():
        torch.testing.assert_close(weight, reference_params[clean(n)].detach(), rtol=1e-3, atol=1e-4,
                                   msg=lambda m, n=n: f"weight {n}: {m}")


def train_and_compare(name: str, cfg, steps: int = 3, zero1: bool = False) -> None:
    """`steps` AdamW steps: parallel losses, gradients and weights equal the reference's.

    Tolerances allow for reductions in another order; a wrong gradient (a missing TP or DP
    reduction) fails the gradient check at the first step.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    reference = fresh_model(name)
    reference_optimizer = build_optimizer(reference, optim_cfg())
    model = parallelize(fresh_model(name), cfg, build_mesh(world, cfg.tensor_parallel_size), "cpu")
    optimizer = (build_zero_redundancy_optimizer(model, optim_cfg()) if zero1
                 else build_optimizer(model, optim_cfg()))
    dp, dp_rank = world // cfg.tensor_parallel_size, rank // cfg.tensor_parallel_size
    share = GLOBAL_BATCH // dp
    for step in range(steps):
        tokens = batch(reference.args.vocab_size, step)
        reference_loss = loss_of(reference, tokens)
        reference_loss.backward()
        loss = loss_of(model, tokens[dp_rank * share:(dp_rank + 1) * share])
        loss.backward()
        assert_step_matches(model, reference, loss, reference_loss, step)
        reference_optimizer.step(), reference_optimizer.zero_grad()
        optimizer.step(), optimizer.zero_grad()
    assert_weights_match(model, reference)
    if zero1:  # each rank keeps AdamW moments for its own parameters only
        states = len(optimizer.optim.state)
        assert 0 < states < len(list(model.parameters())), states


def case_ddp():
    train_and_compare("debug-llama3", parallel_cfg(data_parallel="ddp"))


def case_zero1():
    train_and_compare("debug-qwen3", parallel_cfg(data_parallel="zero1"), zero1=True)


def case_fsdp_activation_checkpointing():
    train_and_compare("debug-qwen3", parallel_cfg(data_parallel="fsdp", activation_checkpointing=True))


def case_tp_qwen3():  # per-head q/k norm, GQA 4:2, tied embeddings
    train_and_compare("debug-qwen3", parallel_cfg(tensor_parallel_size=2))


def case_tp_gpt2():  # biases, LayerNorm, learned positions, GELU MLP
    train_and_compare("debug-gpt2", parallel_cfg(tensor_parallel_size=2))


def case_tp_llama2():  # untied lm_head, no q/k norm
    train_and_compare("debug-llama2", parallel_cfg(tensor_parallel_size=2))


def ddp_resumed(name: str, directory: str):
    """(DDP model, AdamW) at TP 1 on every rank, loaded from the DCP checkpoint in `directory` as
    the trainer resumes (get_state_dict, dcp.load, set_state_dict)."""
    ddp = parallelize(fresh_model(name), parallel_cfg(data_parallel="ddp"), build_mesh(dist.get_world_size(), 1),
                      "cpu")
    ddp_optimizer = build_optimizer(ddp, optim_cfg())
    model_state, optimizer_state = get_state_dict(ddp, ddp_optimizer)
    tensors = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(tensors, checkpoint_id=directory)
    set_state_dict(ddp, ddp_optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])
    return ddp, ddp_optimizer


def case_tp_qwen3_next():  # Gated DeltaNet (2 key / 4 value heads) + dense MLP, gated attention + MoE
    train_and_compare("debug-qwen3-next", parallel_cfg(tensor_parallel_size=2))


def case_tp_qwen3_next_activation_checkpointing():  # the recomputed forward takes the rank's conv channels again
    train_and_compare("debug-qwen3-next", parallel_cfg(tensor_parallel_size=2, activation_checkpointing=True))


def case_tp_qwen3_next_layout():
    """debug-qwen3-next at TP 2: layer 0 a Gated DeltaNet (hidden 64, 2 key heads of 16, 4 value
    heads of 16: C = 128 conv channels), layer 1 gated attention (4 heads, 2 KV heads of 16) + MoE."""
    model = parallelize(fresh_model("debug-qwen3-next"), parallel_cfg(tensor_parallel_size=2),
                        build_mesh(2, 2), "cpu")
    deltanet, attention, moe = model.layers[0].linear_attn, model.layers[1].self_attn, model.layers[1].mlp
    expected = {
        deltanet.in_proj_qkvz.weight: ((96, 64), Shard(0)), deltanet.in_proj_ba.weight: ((4, 64), Shard(0)),
        deltanet.out_proj.weight: ((64, 32), Shard(1)), deltanet.A_log: ((2,), Shard(0)),
        deltanet.dt_bias: ((2,), Shard(0)), deltanet.conv1d.weight: ((128, 1, 4), Replicate()),
        deltanet.norm.weight: ((16,), Replicate()), attention.q_proj.weight: ((64, 64), Shard(0)),
        attention.k_proj.weight: ((16, 64), Shard(0)), attention.o_proj.weight: ((64, 32), Shard(1)),
        attention.q_norm.weight: ((16,), Replicate()), moe.gate.weight: ((8, 64), Replicate()),
    }
    for parameter, (shape, placement) in expected.items():
        assert isinstance(parameter, DTensor) and parameter.placements == (placement,), parameter.placements
        assert tuple(parameter.to_local().shape) == shape, (parameter.to_local().shape, shape)
    # the rank's conv channels: its key head's q and k, its two value heads' v
    weight = deltanet.conv1d.weight.full_tensor()
    rank = dist.get_rank()
    rows = [*range(16 * rank, 16 * rank + 16), *range(32 + 16 * rank, 32 + 16 * rank + 16),
            *range(64 + 32 * rank, 64 + 32 * rank + 32)]
    assert torch.equal(deltanet.head_parameters()[0], weight[rows])


def case_tp_qwen3_next_checkpoint():
    """A DCP checkpoint saved at TP 2 (conv weight Replicate, A_log/dt_bias Shard(0), projections
    Shard(0)/Shard(1)) loads at TP 1 (DDP) into the same whole tensors, AdamW moments too, and
    the next step equals the one-device reference's."""
    name, world, rank = "debug-qwen3-next", dist.get_world_size(), dist.get_rank()
    directory = str(Path(sys.argv[1]).parent / "tp_qwen3_next_checkpoint")
    reference = fresh_model(name)
    reference_optimizer = build_optimizer(reference, optim_cfg())
    split = parallelize(fresh_model(name), parallel_cfg(tensor_parallel_size=2), build_mesh(world, 2), "cpu")
    split_optimizer = build_optimizer(split, optim_cfg())
    for step in range(2):
        tokens = batch(reference.args.vocab_size, step)
        for model, optimizer in ((reference, reference_optimizer), (split, split_optimizer)):
            loss_of(model, tokens).backward()
            optimizer.step(), optimizer.zero_grad()
    model_state, optimizer_state = get_state_dict(split, split_optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)

    ddp, ddp_optimizer = ddp_resumed(name, directory)
    saved = {n: full(p.detach()) for n, p in split.named_parameters()}  # gathered before any assert
    for n, p in ddp.named_parameters():  # the same numbers, bit for bit
        assert torch.equal(p.detach(), saved[clean(n)]), n
    assert_weights_match(ddp, reference)

    tokens = batch(reference.args.vocab_size, 2)
    reference_loss = loss_of(reference, tokens)
    reference_loss.backward()
    loss = loss_of(ddp, tokens[rank * 2:(rank + 1) * 2])
    loss.backward()
    assert_step_matches(ddp, reference, loss, reference_loss, 2)
    reference_optimizer.step(), ddp_optimizer.step()
    assert_weights_match(ddp, reference)


def case_zero1_checkpoint():
    """A ZeRO-1 checkpoint (DCP, disjoint optimizer shares) resumes under DDP and under ZeRO-1."""
    name, world, rank = "debug-qwen3", dist.get_world_size(), dist.get_rank()
    directory = str(Path(sys.argv[1]).parent / "zero1_checkpoint")

    def zero1_model():
        model = parallelize(fresh_model(name), parallel_cfg(data_parallel="zero1"), build_mesh(world, 1), "cpu")
        return model, build_zero_redundancy_optimizer(model, optim_cfg())

    def step(model, optimizer, index):
        tokens = batch(model.module.args.vocab_size, index)
        loss_of(model, tokens[rank * 2:(rank + 1) * 2]).backward()
        optimizer.step(), optimizer.zero_grad()

    original, original_optimizer = zero1_model()
    for index in range(2):
        step(original, original_optimizer, index)
    dcp.save({"model": get_model_state_dict(original),
              "optimizer": zero_redundancy_optimizer_state_dict(original, original_optimizer)},
             checkpoint_id=directory)

    ddp, ddp_optimizer = ddp_resumed(name, directory)

    resumed, resumed_optimizer = zero1_model()
    tensors = {"model": get_model_state_dict(resumed),
               "optimizer": zero_redundancy_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(tensors, checkpoint_id=directory)
    set_model_state_dict(resumed, tensors["model"])

    for model, optimizer in ((original, original_optimizer), (ddp, ddp_optimizer), (resumed, resumed_optimizer)):
        step(model, optimizer, 2)
    expected = dict(original.named_parameters())
    for model in (ddp, resumed):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[n].detach(), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n: f"weight {n}: {m}")


def case_fsdp_layout():
    model = parallelize(fresh_model("debug-qwen3"), parallel_cfg(data_parallel="fsdp"),
                        build_mesh(2, 1), "cpu")
    reference = dict(fresh_model("debug-qwen3").named_parameters())
    for n, p in model.named_parameters():
        assert isinstance(p, DTensor) and p.placements == (Shard(0),), (n, p.placements)
        rows = reference[n].shape[0]
        expected = (rows + 1) // 2 if dist.get_rank() == 0 else rows // 2  # torch.chunk split
        assert p.to_local().shape[0] == expected, (n, p.to_local().shape, rows)
    names = set(model.state_dict())
    assert names == set(fresh_model("debug-qwen3").state_dict()), names ^ set(reference)


def case_fsdp_mixed_precision():
    """FSDP2's MixedPrecisionPolicy: blocks compute with bf16 weights, while the sharded parameters,
    their gradients and the AdamW step stay fp32; the loss follows the fp32 reference closely."""
    model = parallelize(fresh_model("debug-qwen3"), parallel_cfg(data_parallel="fsdp", fsdp_mixed_precision=True),
                        build_mesh(2, 1), "cpu")
    reference = fresh_model("debug-qwen3")
    seen = []
    model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda module, _: seen.append(module.weight.dtype))
    tokens = batch(reference.args.vocab_size, 0)
    share = tokens.chunk(2)[dist.get_rank()]
    loss = loss_of(model, share)
    loss.backward()
    assert seen == [torch.bfloat16], seen
    for n, p in model.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, (n, p.dtype, p.grad.dtype)
    reference_loss = loss_of(reference, share)
    assert abs(loss.item() - reference_loss.item()) < 2e-2 * reference_loss.item(), (loss.item(), reference_loss.item())
    assert loss.item() != reference_loss.item()  # bf16 compute, not the fp32 path


def case_tp_layout():
    # debug-qwen3: hidden 64, 4 heads / 2 KV of 16, MLP 192, vocab 512; TP 2 halves each split.
    model = parallelize(fresh_model("debug-qwen3"), parallel_cfg(tensor_parallel_size=2),
                        build_mesh(2, 2), "cpu")
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    expected = {
        attention.q_proj.weight: ((32, 64), Shard(0)), attention.k_proj.weight: ((16, 64), Shard(0)),
        attention.v_proj.weight: ((16, 64), Shard(0)), attention.o_proj.weight: ((64, 32), Shard(1)),
        mlp.gate_proj.weight: ((96, 64), Shard(0)), mlp.up_proj.weight: ((96, 64), Shard(0)),
        mlp.down_proj.weight: ((64, 96), Shard(1)), model.embed_tokens.weight: ((256, 64), Shard(0)),
        attention.q_norm.weight: ((16,), Replicate()), model.norm.weight: ((64,), Replicate()),
    }
    for parameter, (shape, placement) in expected.items():
        assert isinstance(parameter, DTensor) and parameter.placements == (placement,), parameter.placements
        assert tuple(parameter.to_local().shape) == shape, (parameter.to_local().shape, shape)
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    assert all(isinstance(p, DTensor) for p in model.parameters())


if __name__ == "__main__":
    run_cases(cases_of(globals()))
