"""Pipeline parallelism (PP_SIZE > 1): the blocks split into stages over the "pp" mesh dimension,
one step's micro-batches run by torch.distributed.pipelining's 1F1B schedule.

    python -m pytest tests/integration/test_pipeline.py

Each stage is the whole model (built and initialized as for PP_SIZE=1) with the blocks of the
other stages deleted, the embedding kept on the first stage alone and the final norm + lm_head
on the last alone (torchtitan's split). Parameter names stay the whole model's
(`layers.5.mlp.up_proj.weight` on stage 1 of 3,5), so DCP checkpoints do not depend on PP_SIZE.
The blocks per stage: train/parallel/checks.py pipeline_layers (parallel.pipeline_layers).

The last stage computes the project's token-weighted loss (train/losses.py token_loss, with the
step's `tokens` of train/trainer.py loss_tokens, divided by the accumulation steps as in
accumulate_gradients) and broadcasts the step's loss to the other stages.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B
from torch.distributed.tensor import DTensor

from train.losses import token_loss, unwrap
from train.parallel.checks import pipeline_layers
from train.parallel.layout import ParallelLayout

log = logging.getLogger("train")


def stage_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One stage of CausalLM.hidden_states: token ids (B, T) on the first stage, else the previous
    stage's activations (B, T, D) -> (B, T, D), after the final norm on the last stage."""
    if model.embed_tokens is not None:
        x = model.embed(x, None)
    rope = model.rope(x.shape[1], None, x.dtype)
    for block in model.layers:
        x = block(x, rope)
    return model.norm(x) if model.norm is not None else x


def split_stage(model: nn.Module, stage: int, counts: list[int]) -> nn.Module:
    """Keeps stage `stage` of `model` in place (counts: blocks per stage) and makes its forward
    the stage's (stage_forward); the kept blocks keep their indices, so their names."""
    start = sum(counts[:stage])
    kept = range(start, start + counts[stage])
    for name in list(model.layers._modules):  # a ModuleList with gaps: iteration skips them
        if int(name) not in kept:
            del model.layers._modules[name]
    if stage > 0:
        model.embed_tokens = None
    if stage < len(counts) - 1:
        model.norm = model.lm_head = None
    model.forward = types.MethodType(stage_forward, model)
    return model


def split_model(model: nn.Module, parallel_cfg, stage: int) -> nn.Module:
    """This rank's stage (the "pp" mesh coordinate) of the whole model, split by parallel.pipeline_layers."""
    counts = pipeline_layers(model.args.num_layers, parallel_cfg.pipeline_parallel_size, parallel_cfg.pipeline_layers)
    log.info("pipeline: stage %d of %d, blocks per stage %s", stage, len(counts), ",".join(map(str, counts)))
    return split_stage(model, stage, counts)


class Pipeline:
    """The 1F1B schedule of this rank's stage, built once per job; step() runs one step."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, accumulation: int):
        self.model, self.accumulation = model, accumulation
        self.group = layout.mesh["pp"].get_group()
        self.last = layout.pp - 1
        self.stage = PipelineStage(model, layout.pp_rank, layout.pp, torch.device(layout.device), group=self.group)
        # scale_grads=False: loss() divides by the accumulation steps itself, like accumulate_gradients
        self.schedule = Schedule1F1B(self.stage, accumulation, loss_fn=self.loss, scale_grads=False)
        self.tokens: torch.Tensor | None = None  # the step's loss denominator (trainer.loss_tokens)

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (MBS, T, D) from the last stage; labels (MBS, T, 2): targets and loss mask."""
        loss = token_loss(unwrap(self.model), hidden, labels[..., 0], labels[..., 1], self.tokens)
        return loss / self.accumulation

    def step(self, micro_batches: list, tokens: torch.Tensor, device: str) -> torch.Tensor:
        """Forward and backward of the step's micro-batches [(inputs, targets, mask)]; returns this
        pipeline's share of the step's loss (the sum over its micro-batches), on every stage."""
        self.tokens = tokens
        inputs = torch.cat([batch for batch, _, _ in micro_batches])  # (accumulation x MBS, T)
        labels = torch.cat([torch.stack([targets, mask.to(targets.dtype)], -1) for _, targets, mask in micro_batches])
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.stage.is_first else ()
        if self.stage.is_last:
            self.schedule.step(*args, target=labels, losses=losses, return_outputs=False)
        else:
            self.schedule.step(*args, return_outputs=False)
        total = torch.stack(losses).sum().detach().float() if losses else torch.zeros((), device=device)
        dist.broadcast(total, group=self.group, group_src=self.last)
        return total

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model: the squared norms of the stages summed over "pp"."""
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters]) if parameters else torch.zeros(())
        if isinstance(norm, DTensor):  # FSDP2 inside the stage: the norm over the whole "dp" shards
            norm = norm.full_tensor()
        square = norm.float() ** 2
        dist.all_reduce(square, group=self.group)
        total = square.sqrt()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total
