"""The communication plan of a job: bytes each GPU sends per optimizer step, per collective, and their time.

    python -m train.launch.plan --job qad --config qwen3-8b --dry-run     # "communication" in the JSON
    bash launchers/qad.sh --config qwen3-8b --dry-run --scaling 1,2,4,8   # one row per node count
    python -m pytest tests/integration/test_comm_volume.py                # against gloo's socket bytes

Torch-free, from the shapes memory.py counts too (parameter_groups: the registry's ModelArgs or the
HF config.json). Per optimizer step of `accumulation` micro-batches of MBS x SEQ tokens:

    ddp, zero1    gradients all-reduced over dp once per step (train.parallel.gradient_sync);
                  zero1 then all-gathers the updated parameters (each rank steps 1/dp of them)
    fsdp          FSDP2, ZeRO-3: every micro-batch all-gathers the blocks in forward and again in
                  backward (resharded after forward), the root (embeddings, lm_head) once, and
                  reduce-scatters the gradients (train/trainer.py sync_every_micro_batch)
    fsdp_zero2    every micro-batch all-gathers the blocks and root once (they stay gathered
                  through backward, then are resharded); one reduce-scatter per step (interleaved
                  1F1B: one per micro-batch, and the blocks gathered again for backward, as fsdp)
    tp            all-reduces of MBS x SEQ x hidden (train/parallel/tensor_parallel.py): per dense
                  block 2 in forward (o_proj's and down_proj's partial sums), again when recomputed
                  under activation checkpointing, and in backward one per colwise Linear (each
                  all-reduces its own input gradient: q, k, v_proj, gate and up_proj, GPT-2 no gate:
                  5 or 4, not Megatron's 2 of fused QKV and gate-up); a MoE block only its attention's
                  (1 forward, 3 backward: the MoE runs replicated); the embedding's output, lm_head's
                  input gradient, its logits gathered
    ep            per MoE layer an all-to-all of the routed rows (top-k x hidden) to the experts and
                  one back, in forward and in backward; expert gradients all-reduced over the
                  ranks holding the same experts (edp) once per step
    QAD teacher   forward only: FSDP2's block all-gathers (when the student shards), TP's 2 forward
                  all-reduces per block and its logits gather, EP's 2 all-to-alls per MoE layer
    pp            (PP_SIZE > 1) the collectives above over the stage's parameters only, plus per
                  micro-batch the stage's activations (MBS x SEQ x hidden, master dtype) sent to the next
                  stage and their gradient sent back to the previous: 2 sends on a middle stage, 1 on
                  the first and last; tied embeddings: the embedding gradient all-reduced between
                  the first and last stage once per step. The plan reports the stage that takes longest.

Ring cost per rank (NCCL's rings; n ranks, payload B: the whole reduced or gathered tensor):
all-reduce 2 (n-1)/n B, all-gather and reduce-scatter (n-1)/n B, all-to-all (n-1)/n B (even routing).
Left out: scalars (the loss-token count, the gradient norm), Qwen3's q_norm/k_norm weight
gradients under TP (head_dim elements), DDP's start-up broadcast and its broadcast of the model's
buffers (the rope cache) once per step. Checked against gloo's bytes (tests/integration/
test_comm_volume.py): gloo runs reduce-scatter as an all-reduce and adds a header to each message.

Time: bytes / the bandwidth of the group's slowest link: INTRA_NODE_GBPS (NVLink, default 450
GB/s per GPU and direction, H100/H200 NVLink4) inside a node, INTER_NODE_GBPS (default 50: 400
Gb/s InfiniBand per GPU) when the group spans nodes (ranks are numbered TP fastest, then EP, then
data-parallel; a node holds NUM_GPUS consecutive ranks). COMM_OVERLAP (default 0) is the share
of that time hidden behind compute: step = compute + (1 - COMM_OVERLAP) x communication.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from train.parallel.checks import rank_stages

GB = 1e9
DEFAULT_INTRA_NODE_GBPS = 450.0  # NVLink4 (H100, H200): 900 GB/s both directions per GPU
DEFAULT_INTER_NODE_GBPS = 50.0  # 400 Gb/s InfiniBand NDR, one NIC per GPU
RING_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
               "send": lambda n: 1.0}  # point to point: the whole payload to one peer


@dataclass(frozen=True)
class Interconnect:
    """Bandwidth per GPU and direction, GB/s (bytes, not bits), inside a node and between nodes."""
    gpus_per_node: int
    intra_node_gbps: float = DEFAULT_INTRA_NODE_GBPS
    inter_node_gbps: float = DEFAULT_INTER_NODE_GBPS
    overlap: float = 0.0  # share of the communication time hidden behind compute

    def bandwidth(self, footprint: int) -> float:
        """Bytes/s of a group whose ranks lie within `footprint` consecutive ranks."""
        gbps = self.intra_node_gbps if footprint <= self.gpus_per_node else self.inter_node_gbps
        return gbps * GB


@dataclass(frozen=True)
class Collective:
    name: str
    kind: str  # all_reduce | all_gather | reduce_scatter | all_to_all | send
    group: str  # dp | tp | ep | edp | pp
    ranks: int
    footprint: int  # consecutive ranks the group spans (inside a node when <= GPUs per node)
    payload_bytes: float  # the whole tensor reduced or gathered, summed over the layers: one pass
    times: int  # passes per optimizer step

    @property
    def bytes_per_rank(self) -> float:
        """Bytes this rank sends per optimizer step (ring cost)."""
        return self.times * self.payload_bytes * RING_FACTOR[self.kind](self.ranks)


@dataclass(frozen=True)
class StepShape:
    """What a step moves, apart from the model: sizes, micro-batches and the dtypes."""
    tp: int
    ep: int
    dp: int
    strategy: str  # ddp | fsdp | fsdp_zero2 | zero1
    tokens: int  # MBS x SEQ_LENGTH: one micro-batch on one rank
    accumulation: int
    param_bytes: int  # master weights and gradients: 4 (fp32), 2 (model.param_dtype=bfloat16)
    act_bytes: int  # activations: 2 under PRECISION=bf16
    gather_bytes: int  # FSDP2's all-gather: 2 under FSDP_MIXED_PRECISION, else param_bytes
    checkpointing: bool
    interleaved: bool = False  # PP_SCHEDULE=interleaved_1f1b: FSDP2 reduce-scatters every micro-batch's gradients


def parameter_groups(args) -> dict[str, int]:
    """Elements of the model in four groups: embedding (+ untied lm_head), routed experts, the MoE
    layers' routers and shared experts ("replicated": whole on every TP rank, as
    train/parallel/tensor_parallel.py leaves them), the rest ("dense", split by TP)."""
    from train.models.registry import count_parameters

    total = count_parameters(args)["total"]
    embedding = args.vocab_size * args.hidden_size * (1 if args.tie_embeddings else 2)
    experts = replicated = 0
    if args.num_experts:
        D = args.hidden_size
        moe_layers = sum(args.is_moe_layer(i) for i in range(args.num_layers))
        experts = moe_layers * args.num_experts * 3 * D * args.moe_intermediate_size
        shared = args.shared_expert_intermediate_size  # qwen3_next: SwiGLU + its (1, D) sigmoid gate
        replicated = moe_layers * (args.num_experts * D + (3 * D * shared + D if shared else 0))
    return {"embedding": embedding, "experts": experts, "replicated": replicated,
            "dense": total - embedding - experts - replicated}


def tp_dense(groups: dict[str, int], tp: int) -> float:
    """A TP rank's elements of the layers outside the vocabulary and the routed experts: the
    dense layers split over tp, the MoE routers and shared experts whole."""
    return groups["dense"] / tp + groups["replicated"]


def gradient_collectives(groups: dict[str, int], shape: StepShape, trainable: float | None) -> list[Collective]:
    """The student's data-parallel collectives. trainable: LoRA's adapter elements (the base is
    frozen and only gathered), None: the whole model trains."""
    tp, ep, dp, world = shape.tp, shape.ep, shape.dp, shape.tp * shape.dp
    if dp == 1:
        return []
    non_experts = tp_dense(groups, tp) + groups["embedding"] / tp
    experts = groups["experts"] / ep
    in_dp = non_experts + (experts if ep == 1 else 0)  # under EP the experts stay out of DDP/FSDP
    grads = in_dp if trainable is None else trainable / tp
    out = []

    def add(name, kind, elements, element_bytes, times, group="dp", ranks=dp, footprint=world):
        if elements and times:
            out.append(Collective(name, kind, group, ranks, footprint, elements * element_bytes, times))

    if shape.strategy in ("ddp", "zero1"):
        add("gradients", "all_reduce", grads, shape.param_bytes, 1)
        if shape.strategy == "zero1":
            add("updated parameters", "all_gather", grads, shape.param_bytes, 1)
    else:
        root = groups["embedding"] / tp  # embeddings and an untied lm_head: gathered once a micro-batch
        blocks = in_dp - root
        # interleaved: fsdp_zero2 too reduce-scatters and reshards in every backward (train/parallel/pipeline.py
        # StageChunk), so a block is gathered again for the next micro-batch (at most twice per micro-batch)
        per_micro_batch = shape.strategy == "fsdp" or shape.interleaved
        add("parameters (blocks)", "all_gather", blocks, shape.gather_bytes,
            shape.accumulation * (2 if per_micro_batch else 1))
        add("parameters (root)", "all_gather", root, shape.gather_bytes, shape.accumulation)
        add("gradients", "reduce_scatter", grads, shape.param_bytes, shape.accumulation if per_micro_batch else 1)
    if ep > 1 and dp // ep > 1 and trainable is None:
        add("expert gradients", "all_reduce", experts, shape.param_bytes, 1, group="edp", ranks=dp // ep)
    return out


def tensor_parallel_all_reduces(args, layers: range | None = None) -> tuple[int, int]:
    """All-reduces of (MBS, SEQ, hidden) over the blocks `layers` (None: all) in one forward and one
    backward: rowwise outputs in forward, colwise input gradients in backward (one per colwise Linear;
    a Gated DeltaNet (qwen3_next) has two, in_proj_qkvz and in_proj_ba)."""
    layers = range(args.num_layers) if layers is None else layers
    dense_layers = sum(not args.is_moe_layer(i) for i in layers)
    kinds = args.resolved_layer_types()
    deltanets = sum(kinds[i] == "linear_attention" for i in layers)
    mlp_colwise = 1 if args.family == "gpt2" else 2  # up_proj (and gate_proj)
    forward = len(layers) + dense_layers  # o_proj / out_proj in every block, down_proj in dense ones
    backward = 3 * len(layers) - deltanets + mlp_colwise * dense_layers  # q, k, v_proj; the MLP's colwise
    return forward, backward


def activation_collectives(args, shape: StepShape, *, forward_only: bool, prefix: str = "",
                           layers: range | None = None, first: bool = True, last: bool = True) -> list[Collective]:
    """TP's activation all-reduces and logits gather, EP's all-to-alls, over one step's micro-batches.
    A pipeline stage: its blocks `layers`; the embedding's on the `first` stage, lm_head's on the `last`."""
    out = []
    layers = range(args.num_layers) if layers is None else layers
    passes = 1 if forward_only else 2 + (1 if shape.checkpointing else 0)  # forward, backward, recompute
    token_row = shape.tokens * args.hidden_size * shape.act_bytes  # MBS x SEQ x hidden
    if shape.tp > 1:
        tp, times = shape.tp, shape.accumulation
        forward, backward = tensor_parallel_all_reduces(args, layers)
        out.append(Collective(f"{prefix}block activations (forward)", "all_reduce", "tp", tp, tp,
                              forward * token_row, times * (2 if shape.checkpointing and not forward_only else 1)))
        if not forward_only:
            out.append(Collective(f"{prefix}block activations (backward)", "all_reduce", "tp", tp, tp,
                                  backward * token_row, times))
        edges = first + (last and not forward_only)  # the embedding's output; lm_head's input gradient
        if edges:
            out.append(Collective(f"{prefix}embedding and lm_head activations", "all_reduce", "tp", tp, tp,
                                  token_row, edges * times))
        if last:
            out.append(Collective(f"{prefix}logits", "all_gather", "tp", tp, tp,
                                  shape.tokens * args.vocab_size * shape.act_bytes, times))
    if shape.ep > 1 and args.num_experts:
        moe_layers = sum(args.is_moe_layer(i) for i in layers)
        routed = moe_layers * args.num_experts_per_token * token_row  # rows leaving this rank, all layers
        out.append(Collective(f"{prefix}routed tokens", "all_to_all", "ep", shape.ep, shape.ep * shape.tp,
                              2 * routed, passes * shape.accumulation))  # to the experts and back
    return out


def teacher_collectives(teacher, teacher_bytes: int, shape: StepShape) -> list[Collective]:
    """The frozen QAD teacher, laid out like the student (train.parallel.apply parallelize_frozen):
    FSDP2 gathers its blocks once a micro-batch in forward (its root stays gathered)."""
    out = activation_collectives(teacher, shape, forward_only=True, prefix="teacher ")
    if shape.dp > 1 and shape.strategy in ("fsdp", "fsdp_zero2"):
        groups = parameter_groups(teacher)
        blocks = tp_dense(groups, shape.tp) + (groups["experts"] if shape.ep == 1 else 0)
        out.append(Collective("teacher parameters (blocks)", "all_gather", "dp", shape.dp, shape.tp * shape.dp,
                              blocks * teacher_bytes, shape.accumulation))
    return out


def pipeline_collectives(args, shape: StepShape, stage: int, pp: int, virtual: int = 1) -> list[Collective]:
    """Pipeline rank `stage` of `pp`: its stages' activation sends (forward to the next stage,
    gradients back to the previous, each micro-batch; virtual stages per rank: rank s holds stages
    s, s + pp, ...) and the tied embedding's gradient all-reduce (first and last rank)."""
    stride = shape.dp * shape.tp  # ranks between a rank and its peer in the next stage
    sends = sum((held < pp * virtual - 1) + (held > 0) for held in rank_stages(pp, virtual, stage))
    out = [Collective("stage activations and their gradients", "send", "pp", 2, stride + 1,
                      shape.tokens * args.hidden_size * shape.param_bytes, sends * shape.accumulation)]
    if args.tie_embeddings and stage in (0, pp - 1):
        out.append(Collective("tied embedding gradients", "all_reduce", "pp", 2, (pp - 1) * stride + 1,
                              args.vocab_size * args.hidden_size / shape.tp * shape.param_bytes, 1))
    return out


def step_collectives(args, shape: StepShape, *, teacher=None, teacher_bytes: int = 2,
                     lora_trainable: float | None = None, groups: dict[str, int] | None = None,
                     layers: Sequence[int] | None = None, stage: int = 0, pp: int = 1,
                     virtual: int = 1) -> list[Collective]:
    """Every collective of one optimizer step on one rank, the student's and the teacher's.
    PP (pp > 1): groups and layers, the parameter_groups and blocks of this rank's stage `stage`."""
    out = gradient_collectives(groups or parameter_groups(args), shape, lora_trainable)
    out += activation_collectives(args, shape, forward_only=False, layers=layers, first=stage == 0,
                                  last=stage == pp - 1)
    if pp > 1:
        out += pipeline_collectives(args, shape, stage, pp, virtual)
    if teacher is not None:
        out += teacher_collectives(teacher, teacher_bytes, shape)
    return out


def communication_plan(collectives: list[Collective], link: Interconnect) -> dict:
    """Bytes and seconds per collective and in all; exposed_s: what the step waits for."""
    rows = [{**asdict(c), "bytes_per_rank": c.bytes_per_rank,
             "seconds": c.bytes_per_rank / link.bandwidth(c.footprint),
             "inter_node": c.footprint > link.gpus_per_node} for c in collectives]
    seconds = sum(row["seconds"] for row in rows)
    return {"collectives": rows, "bytes_per_rank": sum(row["bytes_per_rank"] for row in rows),
            "seconds": seconds, "exposed_s": (1 - link.overlap) * seconds, **asdict(link)}


def interconnect(env: dict[str, str], gpus_per_node: int) -> Interconnect:
    """INTRA_NODE_GBPS, INTER_NODE_GBPS and COMM_OVERLAP from the conf's environment."""
    def number(name: str, default: float, highest: float = float("inf"), zero: bool = False) -> float:
        text = env.get(name) or str(default)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not a number") from None
        if value > highest or value < 0 or (value == 0 and not zero):
            raise ValueError(f"{name}={text} must be {'between 0 and ' + f'{highest:g}' if zero else 'above 0'}")
        return value

    return Interconnect(gpus_per_node, number("INTRA_NODE_GBPS", DEFAULT_INTRA_NODE_GBPS),
                        number("INTER_NODE_GBPS", DEFAULT_INTER_NODE_GBPS), number("COMM_OVERLAP", 0.0, 1.0, zero=True))
