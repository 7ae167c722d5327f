"""torchrun --nproc-per-node=2 tests/integration/expert_parallel_worker.py RESULTS.json [CASES]
(driven by test_expert_parallel.py; the ep2_* cases also run on 4 processes: EP 2 x 2 replicas)

Every rank builds debug-qwen3-moe twice from one seed: a single-device reference (EP 1) that
sees the whole global batch, and a copy under EP 2 (train.parallel.parallelize) that sees this
rank's share. Rank 0 writes {case: "ok" | the first failing rank's traceback} to RESULTS.json.
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from train.config import ParallelConfig
from train.models import build_model, init_weights
from train.optim import build_optimizer
from train.parallel import build_mesh, clip_gradients, expert_checkpoint_view, local_view, parallelize
from worker_cases import cases_of, run_cases

MODEL = "debug-qwen3-moe"  # 2 layers (layer 1 MoE: 8 experts, top-2), hidden 64, vocab 512
GLOBAL_BATCH, SEQ_LEN, MAX_NORM, EP = 4, 16, 0.5, 2
WRAPPERS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def parallel_cfg(**overrides) -> ParallelConfig:
    """The typed cfg.parallel (its defaults: DDP, no TP, EP 2) with these fields changed."""
    return ParallelConfig(**{"expert_parallel_size": 2, **overrides})


def optim_cfg():  # eps 1e-4: see parallel_worker.optim_cfg
    return SimpleNamespace(lr=1e-2, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-4)


def fresh_model():
    return init_weights(build_model(MODEL, device="cpu"), 1234)


def batch(step: int) -> torch.Tensor:
    """(GLOBAL_BATCH, SEQ_LEN + 1) tokens, the same on every rank."""
    return torch.randint(0, 512, (GLOBAL_BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(100 + step))


def clean(name: str) -> str:
    for wrapper in WRAPPERS:
        name = name.replace(wrapper, "")
    return name.removeprefix("module.")


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def expected_share(reference: torch.Tensor, name: str, ep: int = EP, tp: int = 1) -> torch.Tensor:
    """The reference tensor, or this rank's experts of it (E/EP rows of an expert weight)."""
    if ".experts." in name:  # EP rank = data-parallel rank % EP, data-parallel rank = rank // TP (mesh.py)
        return reference.chunk(ep)[dist.get_rank() // tp % ep]
    return reference


def loss_and_logits(model, tokens):
    logits = model(tokens[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()), logits


def train_and_compare(cfg, steps: int = 3) -> None:
    """EP 2 (+ DDP or FSDP over the same 2 ranks) against the reference: logits, loss, every
    gradient (router and experts included) after clipping, the gradient norm, and the weights."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep, tp = cfg.expert_parallel_size, cfg.tensor_parallel_size
    reference = fresh_model()
    reference_optimizer = build_optimizer(reference, optim_cfg())
    model = parallelize(fresh_model(), cfg, build_mesh(world, tp, ep=ep), "cpu")
    optimizer = build_optimizer(model, optim_cfg())
    experts = [n for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(p.shape[0] == 8 // ep for n, p in model.named_parameters() if n in experts), experts
    dp_rank = rank // tp
    share = GLOBAL_BATCH // (world // tp)
    for step in range(steps):
        tokens = batch(step)
        reference_loss, reference_logits = loss_and_logits(reference, tokens)
        reference_loss.backward()
        reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), MAX_NORM)
        mine = tokens[dp_rank * share:(dp_rank + 1) * share]
        loss, logits = loss_and_logits(model, mine)
        torch.testing.assert_close(logits, reference_logits[dp_rank * share:(dp_rank + 1) * share], rtol=1e-4,
                                   atol=1e-5)
        loss.backward()
        norm = clip_gradients(model, MAX_NORM)
        torch.testing.assert_close(norm, reference_norm, rtol=1e-4, atol=1e-6)
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # TP ranks hold the same loss
        torch.testing.assert_close(loss, reference_loss.detach(), rtol=1e-5, atol=1e-6)
        reference_grads = {n: p.grad for n, p in reference.named_parameters()}
        for n, p in model.named_parameters():
            name = clean(n)
            torch.testing.assert_close(full(p.grad), expected_share(reference_grads[name], name, ep, tp), rtol=1e-3,
                                       atol=1e-6, msg=lambda m, n=name: f"step {step} grad {n}: {m}")
        reference_optimizer.step(), reference_optimizer.zero_grad()
        optimizer.step(), optimizer.zero_grad()
    reference_params = dict(reference.named_parameters())
    for n, p in model.named_parameters():
        name = clean(n)
        torch.testing.assert_close(full(p.detach()), expected_share(reference_params[name].detach(), name, ep, tp),
                                   rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"weight {n}: {m}")


def case_ep2_ddp():
    train_and_compare(parallel_cfg(data_parallel="ddp"))


def case_ep2_fsdp_activation_checkpointing():
    train_and_compare(parallel_cfg(data_parallel="fsdp", activation_checkpointing=True))


def case_tp2_ep1():
    """TP on a MoE model: attention split, the MoE replicated on both TP ranks."""
    train_and_compare(parallel_cfg(tensor_parallel_size=2, expert_parallel_size=1))


def case_tp2_ep2_fsdp():
    """4 processes: TP pairs, EP across them (Megatron's layout), FSDP2 over the 2 dp ranks."""
    train_and_compare(parallel_cfg(tensor_parallel_size=2, data_parallel="fsdp"))


def case_every_rank_same_tokens():
    """Both ranks feed the same tokens: each expert's rows arrive twice (once per rank)."""
    reference = fresh_model()
    model = parallelize(fresh_model(), parallel_cfg(), build_mesh(2, 1, ep=2), "cpu")
    tokens = batch(7)
    reference_loss, reference_logits = loss_and_logits(reference, tokens)
    loss, logits = loss_and_logits(model, tokens)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-5)
    reference_loss.backward(), loss.backward(), clip_gradients(model, 1e9)
    reference_grads = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_share(reference_grads[clean(n)], clean(n)), rtol=1e-3, atol=1e-6)


def case_checkpoint_ep2_to_ep1_and_ep2():
    """DCP checkpoint of an EP 2 model and its AdamW state: loads into EP 1 (one plain model
    per rank) and into a fresh EP 2 model; one more step matches on all three."""
    world, rank = dist.get_world_size(), dist.get_rank()
    directory = str(Path(sys.argv[1]).parent / "ep_checkpoint")

    def ep2():
        model = parallelize(fresh_model(), parallel_cfg(), build_mesh(world, 1, ep=2), "cpu")
        return model, build_optimizer(model, optim_cfg())

    def step(model, optimizer, index, whole: bool = False):
        tokens = batch(index) if whole else batch(index)[rank * 2:(rank + 1) * 2]
        loss_and_logits(model, tokens)[0].backward()
        clip_gradients(model, 1e9)
        optimizer.step(), optimizer.zero_grad()

    original, original_optimizer = ep2()
    for index in range(2):
        step(original, original_optimizer, index)
    model_state, optimizer_state = get_state_dict(original, original_optimizer)
    saved = expert_checkpoint_view(original, {"model": model_state, "optimizer": optimizer_state})
    dcp.save(saved, checkpoint_id=directory)

    loaded = []
    for build in (lambda: (lambda m: (m, build_optimizer(m, optim_cfg())))(fresh_model()), ep2):
        model, optimizer = build()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        tensors = expert_checkpoint_view(model, {"model": model_state, "optimizer": optimizer_state})
        dcp.load(tensors, checkpoint_id=directory)
        tensors = local_view(tensors)
        set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"])
        loaded.append((model, optimizer))
    (single, single_optimizer), (resumed, resumed_optimizer) = loaded
    assert single.layers[1].mlp.experts.gate_up_proj.shape[0] == 8  # EP 1: all experts

    step(original, original_optimizer, 2)
    step(resumed, resumed_optimizer, 2)
    step(single, single_optimizer, 2, whole=True)  # EP 1 sees the whole batch
    expected = dict(original.named_parameters())
    for n, p in resumed.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"EP 2 {n}: {m}")
    for n, p in single.named_parameters():
        name = "module." + n
        torch.testing.assert_close(expected_share(p.detach(), n), expected[name].detach(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=n: f"EP 1 {n}: {m}")


if __name__ == "__main__":
    run_cases(cases_of(globals()))
