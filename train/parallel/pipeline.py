"""Pipeline parallelism (PP_SIZE > 1): the blocks split into stages over the "pp" mesh dimension,
one step's micro-batches run by torch.distributed.pipelining's 1F1B schedule, or its interleaved
1F1B (parallel.pipeline_schedule, below).

    python -m pytest tests/integration/test_pipeline.py tests/integration/test_pipeline_qad.py

Each stage is the whole model (built and initialized as for PP_SIZE=1) with the blocks of the
other stages deleted, the embedding kept on the first stage alone and the final norm + lm_head
on the last alone (torchtitan's split). Parameter names stay the whole model's
(`layers.5.mlp.up_proj.weight` on stage 1 of 3,5), so DCP checkpoints do not depend on PP_SIZE.
The blocks per stage: train/parallel/checks.py pipeline_layers (parallel.pipeline_layers).

The last stage computes the project's token-weighted loss (train/losses.py token_loss, with the
step's `tokens` of train/trainer.py loss_tokens, divided by the accumulation steps as in
accumulate_gradients; a job may give its own stage_loss, QAD below) and broadcasts the step's
loss and its terms to the other stages.

QAD (train/qad.py Distillation.pipeline_loss): the frozen teacher is split the same way
(split_model; a teacher of another depth into balanced stages) and each rank reads its stage of
it from the HF checkpoint. attach_teacher makes the student stage's forward run the teacher's
stage under no_grad too (teacher_stage_forward) and return the teacher's activations after the
student's, so they travel to the next stage beside them (no gradient goes back for them); the
teacher is no submodule, so no parameter, checkpoint key or DDP bucket. The last stage's loss
is then the job's stage_loss (the chunked KD loss from both final hidden states,
train/distill/loss.py distill_terms) with the same tokens and accumulation scaling, and its
terms (kd_loss, lm_loss) are broadcast with the loss. The student's stage is read alone
(train/engine.py sharded_model_path) and calibrated on the activations of the stage before
(forward_logits; modelopt's amax reduction over stage_group), so its amax values and, joined
over the stages, quantizer_state.pt are PP_SIZE=1's (train/quant/student.py).

MoE (qwen3_moe): the load-balancing loss (train/models/common/moe.py combined_aux_loss) mixes
every MoE layer's routing statistics, so each stage passes on, next to its activations, the
sums over the MoE layers so far of the routed fraction (no gradient) and the mean router
probability per expert; the last stage adds the loss of the totals to the micro-batch's token
loss, as PP_SIZE=1 does, and its gradient goes back to each layer's router through the
schedule's backward sends.

TP inside a stage (the (pp, dp, tp) mesh): train/parallel/tensor_parallel.py splits the stage,
the embedding's and lm_head's plans applied where the stage holds them.

Tied embeddings (tiny-qwen3, qwen3-0.6b): Megatron's scheme. The first stage's embedding and the
last stage's lm_head are two copies of the weight, equal at the start (the whole model is
initialized before the split); after each backward their gradients are summed between the two
stages (the gradient of the one tied weight at PP_SIZE=1), so the same AdamW update keeps them
equal. The gradient norm counts the weight once (the first stage's), and checkpoints keep
PP_SIZE=1's names: the model's lm_head.weight is the copy, and its AdamW state is saved and
loaded under embed_tokens.weight, which PP_SIZE=1 uses for the one tied parameter.

Checkpoints cross layouts (PP 2 <-> PP 1, tests/integration/test_pipeline.py): DCP saves the
optimizer's parameter groups once for all ranks, with one stage's parameter names, so each stage
puts its own names back after the load (loaded_view); the compatibility check compares the
checkpoint with the keys of all stages (train/checkpoint.py model_shapes).

DP_SHARDING=ddp: a stage is not wrapped in DistributedDataParallel. DDP's reducer expects each
backward to follow its own forward; 1F1B runs F0 F1 B0 B1 on the first stage, and the reducer,
armed for the last backward, counts the parameters of both backwards and fails the next forward
(`rebuilt parameter indices size is not same as original model parameters size`). Instead the
stage's gradients are averaged over "dp" after the schedule, in buckets, which is the reduction DDP
makes in the last backward (average_gradients). FSDP2 stages are sharded as without PP.

Interleaved 1F1B (parallel.pipeline_schedule=interleaved_1f1b, parallel.virtual_stages=v >= 2):
PP_SIZE x v stages, rank r holding stages r, r + PP_SIZE, ... (ScheduleInterleaved1F1B). The rank
keeps one model, the whole model less the blocks of the stages it does not hold (split_stage:
the embedding with stage 0, on rank 0; the final norm and lm_head with the last stage, on the last
rank), so the optimizer, checkpoints, clipping, the tied pair and the dp averaging are 1F1B's;
each stage's PipelineStage runs a StageChunk, which holds no submodule and calls that model with
its blocks (stage_forward's chunk). FSDP2 inside the stages: torch's schedule unshards and holds
back gradient sync only for a stage whose module is the FSDP2 module, which a chunk is not, so
FSDP2 runs on its own hooks: through the model's call the root is the first FSDP2 module to run
forward and gathers its own parameters (embedding, final norm, lm_head) as under 1F1B, and with
gradient sync left on every stage backward reduce-scatters its micro-batch's gradients into the
sharded ones (one reduce-scatter per micro-batch, not 1F1B's one per step: the same sum), which
FSDP2's end-of-backward callback waits for before the tied sum and clipping. Refused at plan
time (train/parallel/checks.py, train/launch/plan.py): QAD (the teacher runs in the rank's one
stage) and micro-batches that torch's rounds do not split.

Evaluation (train/validation.py, EVAL_INTERVAL and EVAL_ONLY): forward_logits runs one
micro-batch through the stages without the schedule, one stage after another (no overlap: an
evaluation is a few micro-batches), each stage receiving the previous one's activations in fp32;
the last stage makes the logits; interleaved, the ranks walk the stages in their global order.
"""

from __future__ import annotations

import logging
import types
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from train.losses import split_loss, token_loss, unwrap
from train.models.common.moe import MoE
from train.parallel.checks import pipeline_layers, rank_stages
from train.parallel.expert_parallel import (expert_parameters, gradient_square, reduce_expert_gradients,
                                            scale_gradients)
from train.parallel.layout import ParallelLayout
from train.parallel.mesh import data_parallel_mesh

log = logging.getLogger("train")


def stage_forward(model: nn.Module, x: torch.Tensor, balance: torch.Tensor | None = None,
                  student_only: bool = True, chunk: dict | None = None):
    """One stage of CausalLM.hidden_states: chunk_forward of all of `model`'s blocks (1F1B: a rank's
    one stage), or of the blocks of one of its stages (interleaved: chunk, chunk_forward's keywords,
    given by StageChunk). student_only: forward_logits's flag, which only QAD's teacher_stage_forward reads."""
    whole = dict(names=list(model.layers._modules), first=model.embed_tokens is not None, last=model.norm is not None)
    return chunk_forward(model, x, balance, **(chunk or whole))


def chunk_forward(model: nn.Module, x: torch.Tensor, balance: torch.Tensor | None, *, names: list[str],
                  first: bool, last: bool):
    """The blocks `names` of `model` (looked up at each call: activation checkpointing replaces
    them) as one stage: token ids (B, T) on the first stage (the embedding), else the previous
    stage's activations (B, T, D) -> (B, T, D), after the final norm on the last stage.
    MoE models take and return `balance` too (stage_balance): -> ((B, T, D), (2, E))."""
    if first:
        x = model.embed(x, None)
    rope = model.rope(x.shape[1], None, x.dtype)
    blocks = [model.layers._modules[name] for name in names]
    for block in blocks:
        x = block(x, rope)
    hidden = model.norm(x) if last else x
    return (hidden, stage_balance(model, blocks, balance, hidden.device)) if model.args.num_experts else hidden


def stage_balance(model: nn.Module, blocks: list[nn.Module], balance: torch.Tensor | None,
                  device: torch.device) -> torch.Tensor:
    """(2, E) fp32: `balance` (the earlier stages'; None on the first) plus the MoE layers' of
    `blocks` statistics of the forward just run: row 0 the routed fraction per expert (detached),
    row 1 the mean router probability (differentiable)."""
    total = torch.zeros(2, model.args.num_experts, device=device) if balance is None else balance + 0  # a new tensor
    for block in blocks:
        for layer in block.modules():
            if isinstance(layer, MoE):
                total = total + torch.stack(layer.balance_stats).float()
    return total


class StageChunk(nn.Module):
    """Interleaved 1F1B: one of a rank's stages, the module of its PipelineStage. Its forward calls
    the rank's model (stage_forward with this stage's chunk of blocks); it holds no submodule, so the
    parameters, their names, the optimizer and checkpoints stay the rank's one model's. Through the
    model's own call, FSDP2's root hooks run as under 1F1B: the root is the first FSDP2 module to run
    forward, and it gathers its own parameters (embedding, final norm, lm_head) for the stage."""

    def __init__(self, model: nn.Module, stage: int, layers: range, stages: int):
        super().__init__()
        self.stage = stage
        # a partial, not an attribute: the model would become a submodule
        self.run = partial(model, chunk=dict(names=[str(index) for index in layers], first=stage == 0,
                                             last=stage == stages - 1))

    def forward(self, x: torch.Tensor, balance: torch.Tensor | None = None):
        return self.run(x, balance)


def balance_loss(model: nn.Module, balance: torch.Tensor) -> torch.Tensor:
    """combined_aux_loss x router_aux_loss_coef from the whole model's sums (2, E): HF's means over
    the MoE layers of the fraction and the probability."""
    args = model.args
    layers = sum(args.is_moe_layer(index) for index in range(args.num_layers))
    fraction, probability = balance[0].detach() / layers, balance[1] / layers
    return args.router_aux_loss_coef * args.num_experts * (fraction * probability).sum()


def split_stage(model: nn.Module, stages: list[int], counts: list[int]) -> nn.Module:
    """Keeps the stages `stages` of `model` in place (counts: blocks per stage; the embedding with
    stage 0, the final norm and lm_head with the last) and makes its forward the stage's
    (stage_forward; one stage per rank); the kept blocks keep their indices, so their names.
    model.pipeline_chunks: [(stage, its blocks)], for Pipeline and forward_logits."""
    starts = [sum(counts[:stage]) for stage in range(len(counts))]
    chunks = [(stage, range(starts[stage], starts[stage] + counts[stage])) for stage in stages]
    kept = {index for _, layers in chunks for index in layers}
    for name in list(model.layers._modules):  # a ModuleList with gaps: iteration skips them
        if int(name) not in kept:
            del model.layers._modules[name]
    if 0 not in stages:
        model.embed_tokens = None
        if hasattr(model, "embed_positions"):  # GPT-2's learned positions: the first stage's too
            model.embed_positions = None
    if len(counts) - 1 not in stages:
        model.norm = model.lm_head = None
    model.forward = types.MethodType(stage_forward, model)
    model.pipeline_chunks = chunks
    return model


def split_model(model: nn.Module, parallel_cfg, rank: int, student_layers: int | None = None) -> nn.Module:
    """This pipeline rank's stages (the "pp" mesh coordinate; interleaved: rank, rank + PP_SIZE, ...)
    of the whole model, split by parallel.pipeline_layers. student_layers: the QAD teacher's split
    follows the student's (its layer count here); a teacher of another depth is split into
    balanced stages instead (the list names the student's blocks)."""
    spec = parallel_cfg.pipeline_layers if student_layers in (None, model.args.num_layers) else ""
    pp, virtual = parallel_cfg.pipeline_parallel_size, parallel_cfg.virtual_stages
    counts = pipeline_layers(model.args.num_layers, pp, spec, virtual)
    stages = rank_stages(pp, virtual, rank)
    log.info("pipeline: %sstage%s %s of %d, blocks per stage %s", "" if student_layers is None else "teacher ",
             "s" if virtual > 1 else "", ",".join(map(str, stages)), len(counts), ",".join(map(str, counts)))
    return split_stage(model, stages, counts)


def teacher_stage_forward(model: nn.Module, x: torch.Tensor, *carried: torch.Tensor, teacher: nn.Module,
                          student_only: bool = False):
    """QAD: the student's stage (stage_forward) and, under no_grad, the same stage of the frozen
    teacher. x: token ids (B, T) on the first stage (both models read them), else the student's
    activations; carried: the MoE balance sums of a MoE student, then (last) the teacher's
    activations (B, T, D_teacher) from the previous stage. Returns the student's outputs with the
    teacher's (B, T, D_teacher) appended (after its final norm on the last stage). student_only
    (evaluation, forward_logits): the student's stage alone, nothing carried for the teacher."""
    if student_only:
        return stage_forward(model, x, *carried)
    teacher_input = carried[-1] if carried else x
    student = stage_forward(model, x, *carried[:-1])
    with torch.no_grad():
        teacher_out = teacher(teacher_input)
    # a MoE teacher's balance sums are not used
    teacher_hidden = teacher_out[0] if isinstance(teacher_out, tuple) else teacher_out
    return (*student, teacher_hidden) if isinstance(student, tuple) else (student, teacher_hidden)


def attach_teacher(model: nn.Module, teacher: nn.Module) -> None:
    """Runs `teacher` (this rank's stage of it, split_model) inside the student stage's forward
    (teacher_stage_forward); the teacher is no submodule: no parameter, state-dict key or DDP bucket."""
    unwrap(model).forward = types.MethodType(partial(teacher_stage_forward, teacher=teacher), unwrap(model))


class Pipeline:
    """The 1F1B schedule of this rank's stage (interleaved 1F1B: of its stages, StageChunk each),
    built once per job; step() runs one step."""

    def __init__(self, model: nn.Module, layout: ParallelLayout, accumulation: int, stage_loss=None):
        self.model, self.accumulation = model, accumulation
        # stage_loss(inner, hidden, targets, mask, tokens, *extra) -> loss or (loss, terms): the last stage's
        # loss from its outputs (extra: what it carries beside them, QAD's teacher activations); pretrain's:
        # token_loss (the MoE term is added by loss())
        self.stage_loss = stage_loss or token_loss
        # the loss terms (QAD: kd_loss, lm_loss) of each loss call of this step, on the last stage: the first
        # step's schedule also calls the loss once for its shape inference, on uninitialized activations
        self.micro_terms: list[dict[str, torch.Tensor]] = []
        self.term_names: list[str] | None = None  # their names, the same on every stage (the first step's)
        self.group = layout.mesh["pp"].get_group()
        self.last = layout.pp - 1
        self.is_first, self.is_last = layout.pp_rank == 0, layout.pp_rank == self.last  # rank of stage 0, of the last
        self.device = torch.device(layout.device)
        self.schedule = pipeline_schedule(model, layout, accumulation, self.group, self.loss)
        self.tokens: torch.Tensor | None = None  # the step's loss denominator (trainer.loss_tokens)
        # tied embeddings: the group of this rank's first- and last-stage copies (None: untied, or a middle stage)
        self.tied_group = embedding_group(layout) if unwrap(model).args.tie_embeddings else None
        # DP_SHARDING=ddp with dp > 1: the dp group this stage's gradients are averaged over (None: FSDP2 or dp 1)
        self.dp_group = data_parallel_mesh(layout.mesh).get_group() \
            if layout.dp_size > 1 and not isinstance(model, FSDPModule) else None

    def loss(self, output, labels: torch.Tensor) -> torch.Tensor:
        """output: hidden (MBS, T, D) from the last stage, then the balance sums (2, E) of a MoE model,
        then what stage_loss takes beside them (QAD: the teacher's hidden states);
        labels (MBS, T, 2): targets and loss mask."""
        inner = unwrap(self.model)
        hidden, *extra = output if isinstance(output, tuple) else (output,)
        balance = extra.pop(0) if inner.args.num_experts else None
        loss, terms = split_loss(self.stage_loss(inner, hidden, labels[..., 0], labels[..., 1], self.tokens, *extra))
        if balance is not None:  # the MoE auxiliary loss: a mean per micro-batch, as language_model_loss adds it
            loss = loss + balance_loss(inner, balance)
        self.micro_terms.append(terms)
        return loss / self.accumulation

    def step(self, micro_batches: list, tokens: torch.Tensor, device: str) -> tuple[torch.Tensor, dict]:
        """Forward and backward of the step's micro-batches [(inputs, targets, mask)]; returns this
        pipeline's share of the step's loss (the sum over its micro-batches) and of its terms
        ({name: share}, as accumulate_gradients), on every stage."""
        self.tokens, self.micro_terms = tokens, []
        inputs = torch.cat([batch for batch, _, _ in micro_batches])  # (accumulation x MBS, T)
        labels = torch.cat([torch.stack([targets, mask.to(targets.dtype)], -1) for _, targets, mask in micro_batches])
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.is_first else ()
        if self.is_last:
            self.schedule.step(*args, target=labels, losses=losses, return_outputs=False)
        else:
            self.schedule.step(*args, return_outputs=False)
        if self.dp_group is not None:
            self.average_gradients()
        if self.tied_group is not None:
            self.sum_tied_gradients()
        terms: dict[str, torch.Tensor] = {}  # the step's micro-batches' (the last calls) / accumulation, as
        for micro in self.micro_terms[len(self.micro_terms) - self.accumulation:]:  # accumulate_gradients
            for name, value in micro.items():
                terms[name] = terms.get(name, 0.0) + value.float() / self.accumulation
        if self.term_names is None:  # once: the other stages learn the names of the last stage's terms
            names = [sorted(terms)]
            dist.broadcast_object_list(names, group=self.group, group_src=self.last)
            self.term_names = names[0]
        total = torch.stack(losses).sum().detach().float() if losses else torch.zeros((), device=device)
        zero = torch.zeros((), device=device)
        reduced = torch.stack([total, *(terms.get(name, zero).detach() for name in self.term_names)])
        dist.broadcast(reduced, group=self.group, group_src=self.last)  # (1 + terms,): the loss and its terms
        return reduced[0], dict(zip(self.term_names, reduced[1:]))

    def average_gradients(self, bucket_elements: int = 25_000_000) -> None:
        """DDP's reduction of the stage's gradients, once per step: each bucket of about
        `bucket_elements` (DDP's 25M elements, 100 MB of fp32) flattened, all-reduced over "dp" and
        divided by the dp size, so a rank holds at most one bucket beyond its gradients."""
        size = dist.get_world_size(self.dp_group)
        bucket: list[torch.Tensor] = []
        elements = 0
        experts = set(map(id, expert_parameters(self.model)))  # EP: reduced over "edp" by clip_gradients
        grads = [p.grad for p in self.model.parameters() if p.grad is not None and id(p) not in experts]
        for index, grad in enumerate(grads):
            bucket.append(grad)
            elements += grad.numel()
            if index == len(grads) - 1 or elements >= bucket_elements:
                flat = _flatten_dense_tensors(bucket)
                dist.all_reduce(flat, group=self.dp_group)
                for grad_in_bucket, averaged in zip(bucket, _unflatten_dense_tensors(flat.div_(size), bucket)):
                    grad_in_bucket.copy_(averaged)
                bucket, elements = [], 0

    def tied_weight(self) -> nn.Parameter:
        """This stage's copy of the tied weight (FSDP2 replaces parameters: looked up each time)."""
        inner = unwrap(self.model)
        return inner.embed_tokens.weight if self.is_first else inner.lm_head.weight

    def sum_tied_gradients(self) -> None:
        """embedding gradient + lm_head gradient on both copies, after the data-parallel reduction
        (FSDP2: each dp rank's shard, the same rows on both stages). Under TP both copies are
        vocabulary shards, but the embedding's gradient comes back Replicate: it is put on its
        weight's placement first, so that both stages reduce the same rows."""
        weight = self.tied_weight()
        grad = weight.grad
        if grad is None:  # frozen on both stages (a LoRA base): nothing to sum
            return
        if isinstance(grad, DTensor):
            if grad.placements != weight.placements:
                grad = weight.grad = grad.redistribute(placements=weight.placements)
            grad = grad.to_local()
        dist.all_reduce(grad, group=self.tied_group)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """clip_grad_norm_ over the whole model: the squared norms of the stages summed over "pp"
        (the last stage's copy of a tied weight left out of the sum: it counts once). EP inside the
        stage: the expert gradients are finished first (summed over "edp", divided by dp) and their
        squared norm summed over the "ep" group, which holds each of the stage's experts once."""
        reduce_expert_gradients(self.model)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        copy = self.tied_weight() if self.tied_group is not None and self.is_last else None
        square = gradient_square(self.model, [p for p in parameters if p is not copy]).to(self.device)
        dist.all_reduce(square, group=self.group)
        total = square.sqrt()
        scale_gradients(parameters, max_norm, total)
        return total

    def checkpoint_view(self, tensors: dict) -> dict:
        """{"model", "optimizer"} of get_state_dict with the last stage's AdamW state of a tied
        lm_head named embed_tokens.weight, PP_SIZE=1's name for the tied parameter."""
        return self.renamed(tensors, {"lm_head.weight": "embed_tokens.weight"})

    def loaded_view(self, tensors: dict, param_groups: list[list[str]]) -> dict:
        """checkpoint_view's tensors after dcp.load, back in this stage's names. param_groups: each
        optimizer group's parameter names before the load, put back: the checkpoint holds one
        rank's lists (DCP keeps one copy of a key every rank saves), another stage's parameters."""
        for group, names in zip(tensors["optimizer"]["param_groups"], param_groups):
            group["params"] = names
        return self.renamed(tensors, {"embed_tokens.weight": "lm_head.weight"})

    def renamed(self, tensors: dict, rename: dict[str, str]) -> dict:
        """The optimizer state and groups under other names, on the last stage of a tied model."""
        if self.tied_group is None or not self.is_last:
            return tensors
        optimizer = dict(tensors["optimizer"])
        optimizer["state"] = {rename.get(name, name): state for name, state in optimizer["state"].items()}
        optimizer["param_groups"] = [{**group, "params": [rename.get(name, name) for name in group["params"]]}
                                     for group in optimizer["param_groups"]]
        return {**tensors, "optimizer": optimizer}


def pipeline_schedule(model: nn.Module, layout: ParallelLayout, accumulation: int, group, loss_fn):
    """Schedule1F1B over the rank's one stage (the model itself), or ScheduleInterleaved1F1B over
    its stages (StageChunk each; stage s on rank s % PP_SIZE, torch's placement too)."""
    device, chunks = torch.device(layout.device), unwrap(model).pipeline_chunks
    # scale_grads=False: the loss divides by the accumulation steps itself, like accumulate_gradients
    if len(chunks) == 1:
        stage = PipelineStage(model, layout.pp_rank, layout.pp, device, group=group)
        return Schedule1F1B(stage, accumulation, loss_fn=loss_fn, scale_grads=False)
    stages = layout.pp * len(chunks)
    pipeline_stages = [PipelineStage(StageChunk(unwrap(model), stage, layers, stages), stage, stages, device,
                                     group=group) for stage, layers in chunks]
    return ScheduleInterleaved1F1B(pipeline_stages, accumulation, loss_fn=loss_fn, scale_grads=False)


def forward_logits(model: nn.Module, layout: ParallelLayout, inputs: torch.Tensor) -> torch.Tensor | None:
    """Logits (B, T, V) of token ids `inputs` (B, T) on the last stage's rank, None on the others:
    each of the rank's stages in turn (interleaved: stage s on rank s % PP_SIZE, all ranks walking
    the stages in order), its forward on the ids (stage 0) or on the activations (B, T, D)
    received from the previous stage, sent on to the next in fp32 (the residual stream's dtype)."""
    group, pp = layout.mesh["pp"].get_group(), layout.pp
    inner = unwrap(model)
    chunks = inner.pipeline_chunks
    stages = pp * len(chunks)
    for stage, layers in chunks:
        x = inputs
        if stage > 0:
            x = torch.empty(*inputs.shape, inner.args.hidden_size, dtype=torch.float32, device=inputs.device)
            dist.recv(x, group=group, group_src=(stage - 1) % pp)
            x = x.to(next(inner.parameters()).dtype)  # a bf16 model's residual stream is bf16
        # QAD (one stage per rank): without the teacher's stage
        output = model(x, student_only=True) if len(chunks) == 1 else StageChunk(inner, stage, layers, stages)(x)
        hidden = output[0] if isinstance(output, tuple) else output  # MoE: (hidden, balance sums)
        if stage < stages - 1:
            dist.send(hidden.float().contiguous(), group=group, group_dst=(stage + 1) % pp)
    return inner.lm_head(hidden) if layout.pp_rank == pp - 1 else None


def stage_group(layout: ParallelLayout):
    """The process group of this rank's stage: the ranks of its "pp" coordinate (dp x tp, with
    EP's split). Every rank creates every stage's group (new_group's rule)."""
    mine = None
    for stage, ranks in enumerate(layout.mesh.mesh):  # (pp, ...) global ranks
        group = dist.new_group(ranks.flatten().tolist())
        if stage == layout.pp_rank:
            mine = group
    return mine


def embedding_group(layout: ParallelLayout):
    """The process group of this rank's first and last stage ranks (the same dp and tp
    coordinates), None on a middle stage. Every rank creates every pair's group (new_group's rule)."""
    ranks = layout.mesh.mesh  # (pp, dp, tp) global ranks
    mine = None
    for first, last in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist()):
        group = dist.new_group([first, last])
        if layout.rank in (first, last):
            mine = group
    return mine
