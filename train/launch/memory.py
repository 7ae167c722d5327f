"""The memory and time plan of a job: what each GPU holds and how long the job runs, before the queue.

    python -m train.launch.plan --job qad --config qwen3-8b --dry-run     # "memory" and "time" in the JSON
    python -m pytest tests/unit/test_launch_memory.py

Torch-free arithmetic on the model's shapes (ModelArgs from the registry or the HF config.json).
Bytes per GPU, for this rank's share of the model (tp, ep and data-parallel sharding applied):

    parameters    P_local x master bytes (4: fp32 master weights; 2 with model.param_dtype=bfloat16);
                  a LoRA base counts its frozen weights the same way, the adapters in fp32
    gathered      FSDP2: the unsharded blocks it all-gathers (fsdp: two blocks, the current one and
                  the prefetched next; fsdp_zero2, and both under PP 1F1B: every block stays
                  gathered for backward)
    gradients     trainable P_local x master bytes; fsdp_zero2 with accumulation > 1: unsharded (its
                  gradients are reduce-scattered once per step, train.parallel.gradient_sync; fsdp
                  reduce-scatters each micro-batch's and keeps them sharded). PP 1F1B: unsharded
                  under both (torch's stage syncs and reshards in the step's last backward only);
                  interleaved 1F1B: both reduce-scatter each micro-batch's (fsdp_zero2's planned
                  unsharded gradients are an upper bound there)
    initialization  pretraining without HF weights: the whole fp32 model (PP: the stage's),
                  initialized on every GPU before FSDP2, TP or EP split it (with_initialization;
                  the peak is the larger of this + the fixed overhead and the step's peak)
    ddp_buckets   DDP and ZeRO-1 on more than one rank: the all-reduce buckets, a second copy
                  (PP: at most one bucket of 25M elements, flattened by the stage's averaging)
    optimizer     AdamW's exp_avg + exp_avg_sq: trainable P_local x 2 x master bytes (ZeRO-1: / dp)
    teacher       QAD: the frozen teacher in its checkpoint's dtype, split like the student (PP:
                  the stage's share of it, as train/parallel/pipeline.py splits it)
    activations   what backward needs of MBS x SEQ_LENGTH tokens: per layer and token the norm
                  inputs (fp32 residual stream) and ~2 D + 4 q-width + 5 kv-width + 4 F values in the
                  compute dtype (bf16 under PRECISION=bf16); with activation checkpointing one
                  block input per layer plus one block recomputed; MoE layers by routed tokens
    loss          the fused lm_head loss's chunk of fp32 logits (<= 1 GiB) and its fp32 gradients;
                  whole logits (x3) under TP (see loss_bytes); QAD's KD loss holds the
                  teacher's logits too
    overhead      CUDA context, NCCL buffers and allocator slack: a fixed 3 GiB + 5% of the rest

The peak ("total") is not the sum: gradients (set to None after each step) and activations
(freed through backward) peak at different moments; memory_breakdown says how they combine.

Pipeline parallelism (PP_SIZE > 1, train/parallel/pipeline.py): each GPU holds its stage's share
(pipeline_stages): its blocks, the embedding on the first stage, the final norm and lm_head on
the last (a tied lm_head: the last stage's copy of the embedding), so parameters, gradients and
AdamW state are the stage's, and so is the QAD teacher (teacher_pipeline_stages); 1F1B keeps
the activations of up to PP_SIZE - s micro-batches of stage s (PP_SIZE on the first stage, at
most the step's micro-batches); the loss's logits only on the last stage. The plan's figure is
the largest stage's total.

The time: training FLOPs (the PaLM count of flops_per_token, + the teacher's forward for QAD)
over the GPUs' peak bf16 FLOP/s at an assumed MFU (ASSUMED_MFU, default 0.35), and the chained
SLURM jobs the wrapper's time limit (#SBATCH --time, or SBATCH_TIMELIMIT) implies. With PP_SIZE=p
and m micro-batches per step, 1F1B idles each stage for p - 1 of its m + p - 1 slots: the
compute time grows by (m + p - 1) / m, the pipeline bubble (p - 1) / (m + p - 1) of it (stages
taken as balanced). Interleaved 1F1B (PP_SCHEDULE=interleaved_1f1b, v = PP_VIRTUAL_STAGES stages
per GPU, each 1/v of its work): v m + p - 1 slots of 1/v, so the compute grows by (v m + p - 1) / (v m),
Megatron's bubble (p - 1) / (v m), and rank s keeps the activations of torch's warm-up
((v - 1) x the micro-batches of a round + 2 (p - 1 - s) stage forwards) plus one, 1/v each. The communication plan (comms.py) is the stage's: its own gradients and its
activation sends between stages.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from train.launch.comms import (Interconnect, StepShape, communication_plan, interconnect, parameter_groups,
                                step_collectives, tp_dense)
from train.mfu import peak_flops_for_name
from train.parallel.checks import pipeline_layers, rank_stages

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig

GIB = 2**30
OVERHEAD_BYTES, OVERHEAD_SHARE = 3 * GIB, 0.05
LOSS_CHUNK_BYTES = GIB  # train/losses.py CHUNK_BYTES: fp32 logits per chunk
STAGE_BUCKET_ELEMENTS = 25_000_000  # train/parallel/pipeline.py average_gradients: DDP's 25M elements
DEFAULT_MFU = 0.35
SIGNAL_MARGIN_S = 300  # the wrappers' --signal=B:USR2@300: the save starts 5 minutes before the limit

# GPU memory in GB (10^9 bytes, as vendors state it), matched on GPU_TYPE; GPU_MEMORY_GB overrides.
GPU_MEMORY_GB = {"h100": 80, "h200": 141, "b200": 180, "gb200": 186, "a100-40gb": 40, "a100": 80,
                 "a100-80gb": 80}
DEFAULT_GPU = "h100"
AUTO_ORDER = ("ddp", "zero1", "fsdp_zero2", "fsdp")  # DP_SHARDING=auto, fastest first: fewer collectives


@dataclass(frozen=True)
class Split:
    """How the plan cuts a rank's share: tp, ep, dp and the data-parallel strategy (sizes only;
    the job's ParallelLayout in train/parallel/layout.py holds the real mesh)."""
    tp: int
    ep: int
    dp: int
    strategy: str  # ddp | fsdp | fsdp_zero2 | zero1
    pp: int = 1  # pipeline stages (PP_SIZE)
    pipeline_layers: str = ""  # PP_LAYERS: blocks per stage (empty: balanced, train/parallel/checks.py)
    virtual: int = 1  # PP_VIRTUAL_STAGES: stages per rank (interleaved 1F1B)


@dataclass(frozen=True)
class Stage:
    """What one GPU's pipeline stage holds: the whole model at PP_SIZE=1."""
    groups: dict[str, int]  # parameter_groups of its part of the model
    layers: Sequence[int]  # its blocks (interleaved: those of all its stages)
    in_flight: float = 1  # micro-batches whose activations it keeps at once (1F1B; interleaved: chunks / virtual)
    loss: bool = True  # lm_head and the loss: the last stage


def block_groups(args, index: int) -> dict[str, int]:
    """parameter_groups of block `index` alone: a two-block model of its kind less a one-block one."""
    kind = dict(decoder_sparse_step=1, mlp_only_layers=() if args.is_moe_layer(index) else (0, 1))
    two, one = (parameter_groups(dataclasses.replace(args, num_layers=n, **kind)) for n in (2, 1))
    return {name: two[name] - one[name] for name in ("dense", "experts", "replicated")}


def pipeline_stages(args, pp: int = 1, spec: str = "", accumulation: int = 1, virtual: int = 1) -> list[Stage]:
    """Each pipeline rank's share (PP_SIZE=pp, PP_LAYERS=spec): its blocks; the first rank the
    embedding, the last the final norm and lm_head (tied: a copy of the embedding); rank s keeps
    the activations of min(pp - s, accumulation) micro-batches (1F1B's warm-up fills pp - s).
    virtual > 1 (interleaved 1F1B): rank s holds stages s, s + pp, ... (interleaved_in_flight)."""
    whole = parameter_groups(args)
    if pp == 1:
        return [Stage(whole, range(args.num_layers))]
    blocks = [block_groups(args, index) for index in range(args.num_layers)]
    positions = args.max_seq_len * args.hidden_size if args.family == "gpt2" else 0  # GPT-2's learned ones
    final_norm = whole["dense"] - sum(block["dense"] for block in blocks) - positions
    counts = pipeline_layers(args.num_layers, pp, spec, virtual)
    starts = [sum(counts[:stage]) for stage in range(len(counts))]
    stages = []
    for stage in range(pp):
        layers = [index for held in rank_stages(pp, virtual, stage)
                  for index in range(starts[held], starts[held] + counts[held])]
        last = stage == pp - 1
        groups = {"embedding": args.vocab_size * args.hidden_size if stage in (0, pp - 1) else 0,
                  "experts": sum(blocks[i]["experts"] for i in layers),
                  "replicated": sum(blocks[i]["replicated"] for i in layers),
                  "dense": sum(blocks[i]["dense"] for i in layers) + (final_norm if last else 0)
                  + (positions if stage == 0 else 0)}
        in_flight = min(pp - stage, accumulation) if virtual == 1 else interleaved_in_flight(pp, virtual, stage,
                                                                                              accumulation)
        stages.append(Stage(groups, range(layers[0], layers[-1] + 1) if virtual == 1 else tuple(layers), in_flight,
                            last))
    return stages


def interleaved_in_flight(pp: int, virtual: int, rank: int, micro_batches: int) -> float:
    """Interleaved 1F1B: the stage forwards whose activations rank `rank` keeps at most, torch
    2.13's warm-up ((virtual - 1) x the micro-batches of a round + 2 per rank before the last) and
    the steady state's one, in micro-batches of all its stages (a stage holds 1/virtual of them)."""
    per_round = micro_batches // max(1, micro_batches // pp)
    warmup = (virtual - 1) * per_round + 2 * (pp - 1 - rank)
    return min(warmup + 1, micro_batches * virtual) / virtual


def local_elements(groups: dict[str, int], layout: Split, fsdp_sharded: bool) -> float:
    """This rank's parameters: TP splits the dense layers and the vocabulary (not the MoE routers
    and shared experts), EP the experts, FSDP2 the rest over dp (under EP > 1 the experts stay
    out of FSDP, split by EP only)."""
    non_experts = tp_dense(groups, layout.tp) + groups["embedding"] / layout.tp
    experts = groups["experts"] / layout.ep
    if fsdp_sharded:
        non_experts /= layout.dp
        experts /= layout.dp if layout.ep == 1 else 1
    return non_experts + experts


def lora_elements(args, rank: int, targets: list[str]) -> int:
    """Adapter elements: r x (in + out) per targeted linear of every layer."""
    D, F = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    shapes = {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
              "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}
    return args.num_layers * sum(rank * sum(shapes[t]) for t in targets if t in shapes)


def activation_bytes(args, tokens: int, act_bytes: int, layout: Split,
                     layers: range | None = None) -> tuple[float, float]:
    """(bytes backward keeps of `tokens` tokens through `layers` (None: all), bytes of the largest layer)
    on this rank; TP splits the head and MLP widths. Per layer and token: the norm inputs of the
    fp32 residual stream (2 D x 4) and the norm outputs (2 D x 4, and their bf16 copies under
    autocast), q/k/v and the attention output (~4 q + 5 kv), the MLP's gate, up, act and product
    (4 F); an MoE layer keeps its routed rows (top-k x (D + 4 Fm)) and the router's logits."""
    D, F = args.hidden_size, args.intermediate_size / layout.tp
    q, kv = args.num_heads * args.head_dim / layout.tp, args.num_kv_heads * args.head_dim / layout.tp
    norms = 4 * D * 4 + (2 * D * act_bytes if act_bytes < 4 else 0)
    per_layer = []
    for i in range(args.num_layers) if layers is None else layers:
        mlp = 4 * F
        if args.num_experts and args.is_moe_layer(i):
            mlp = args.num_experts_per_token * (D + 4 * args.moe_intermediate_size) + args.num_experts
        per_layer.append(norms + (4 * q + 5 * kv + mlp) * act_bytes)
    return tokens * (sum(per_layer) + 3 * D * 4), tokens * max(per_layer)  # + embedding out, final norm


def loss_bytes(args, tokens: int, distill_rows: int | None, fused: bool) -> float:
    """The loss's largest moment. Fused (train/losses.py): a chunk of fp32 logits (<= 1 GiB) and
    its softmax, the lm_head weight gradient and the hidden-state gradient; QAD's KD loss
    (train/distill/chunked.py) takes distill_rows positions a chunk, the teacher's logits beside.
    Under TP (the vocabulary-split lm_head gathers the whole vocabulary): whole fp32 logits,
    their log-softmax and gradient."""
    V, D = args.vocab_size, args.hidden_size
    models = 1 if distill_rows is None else 2
    if not fused:
        return 3 * tokens * V * 4 * models
    rows = max(1, min(tokens, distill_rows or LOSS_CHUNK_BYTES // (V * 4)))
    chunk = rows * V * 4 * models
    return chunk * 2 + V * D * 4 + tokens * D * 4


def memory_breakdown(args, *, job: str, layout: Split, mbs: int, seq_length: int, param_bytes: int,
                     act_bytes: int, checkpointing: bool, accumulation: int = 1, teacher=None,
                     teacher_bytes: int = 2, lora: tuple[int, list[str]] | None = None,
                     distill_rows: int = 512, fsdp_mixed_precision: bool = False,
                     stage: Stage | None = None, teacher_stage: Stage | None = None) -> dict[str, float]:
    """Bytes per GPU by category (the module docstring says what each holds) and the peak, "total".
    stage: the GPU's pipeline stage (pipeline_stages; None: the whole model); teacher_stage: the
    same stage of the teacher (None: the whole teacher).

    The peak is what stays (parameters, gathered blocks, optimizer state, the teacher, DDP's
    buckets) plus the larger of the two moments of a step: the end of the forward (activations
    and the loss's chunk; gradients only when an earlier micro-batch left them) and the end of
    the backward (every gradient, activations freed)."""
    stage = stage or pipeline_stages(args)[0]
    groups, blocks = stage.groups, len(stage.layers)
    fsdp = layout.strategy in ("fsdp", "fsdp_zero2")
    params = local_elements(groups, layout, fsdp)
    trainable, trained_bytes = params, param_bytes
    out = {"parameters": params * param_bytes}
    if lora is not None:  # frozen base in the master dtype, fp32 adapters
        trainable, trained_bytes = lora_elements(args, *lora) / layout.tp / (layout.dp if fsdp else 1), 4
        out["parameters"] += trainable * 4
    out["gathered"] = 0.0
    # PP 1F1B x FSDP2: torch's stage turns gradient sync and resharding after backward off until the
    # step's last backward (torch.distributed.pipelining's stage), as fsdp_zero2 does over a step
    held_to_step_end = fsdp and layout.pp > 1 and layout.virtual == 1
    if fsdp:  # unsharded blocks: two at a time (fsdp), or all of them through backward (fsdp_zero2)
        sharded_experts = groups["experts"] if layout.ep == 1 else 0  # FSDP gathers them with their block
        gathered_bytes = 2 if fsdp_mixed_precision else param_bytes  # MixedPrecisionPolicy gathers bf16
        block = (tp_dense(groups, layout.tp) + sharded_experts) / blocks * gathered_bytes
        out["gathered"] = 2 * block if layout.strategy == "fsdp" and not held_to_step_end else block * blocks
    out["gradients"] = trainable * trained_bytes
    if (layout.strategy == "fsdp_zero2" or held_to_step_end) and accumulation > 1:
        # reduce-scattered in the last micro-batch only: whole gradients until then (fsdp, ZeRO-3,
        # reduce-scatters every micro-batch: trainer.accumulate_gradients)
        out["gradients"] *= (local_elements(groups, layout, False) / params) if lora is None else layout.dp
    out["ddp_buckets"] = trainable * trained_bytes if layout.dp > 1 and layout.strategy in ("ddp", "zero1") else 0.0
    if layout.pp > 1:  # no DDP wrapper: the stage averages one bucket of 25M elements at a time (pipeline.py)
        out["ddp_buckets"] = min(out["ddp_buckets"], STAGE_BUCKET_ELEMENTS * trained_bytes)
    optimizer = trainable * 2 * trained_bytes
    out["optimizer"] = optimizer / layout.dp if layout.strategy == "zero1" else optimizer
    out["teacher"] = 0.0
    if teacher is not None:
        teacher_groups = (teacher_stage or pipeline_stages(teacher)[0]).groups
        out["teacher"] = local_elements(teacher_groups, layout, fsdp) * teacher_bytes
    tokens = mbs * seq_length
    activations, one_layer = activation_bytes(args, tokens, act_bytes, layout, stage.layers)
    activations *= stage.in_flight  # 1F1B: the micro-batches forwarded and not yet backwarded
    if job == "qad":  # fake-quantized linear inputs kept for backward: one more copy of them
        activations, one_layer = activations * 1.5, one_layer * 1.5
    # bf16 autocast caches a bf16 copy of each fp32 weight it multiplies, through the backward
    # (not under FSDP2's MixedPrecisionPolicy: its gathered blocks are already bf16)
    autocast = act_bytes < 4 and param_bytes == 4 and not (fsdp and fsdp_mixed_precision)
    out["autocast_weights"] = params * 2 if autocast else 0.0
    if checkpointing:  # block inputs stay; one block is recomputed at a time in the backward
        kept = tokens * blocks * args.hidden_size * 4 * stage.in_flight
        out["activations"], recomputed = kept, one_layer
    else:
        out["activations"], recomputed = activations, 0.0
    fused = layout.tp == 1
    out["loss"] = loss_bytes(args, tokens, distill_rows if job == "qad" else None, fused) if stage.loss else 0.0
    staying = sum(out[k] for k in ("parameters", "gathered", "ddp_buckets", "optimizer", "teacher"))
    earlier_gradients = out["gradients"] if accumulation > 1 else 0.0
    forward_end = out["autocast_weights"] + out["activations"] + out["loss"] + earlier_gradients
    backward = out["autocast_weights"] + out["activations"] + recomputed + out["gradients"]
    peak = staying + max(forward_end, backward)
    out["overhead"] = OVERHEAD_BYTES + OVERHEAD_SHARE * peak
    out["total"] = peak + out["overhead"]
    return out


def gpu_memory_bytes(env: dict[str, str]) -> tuple[str, float]:
    """(GPU name, bytes): GPU_MEMORY_GB wins, else GPU_TYPE's entry in GPU_MEMORY_GB (default h100)."""
    name = env.get("GPU_TYPE", DEFAULT_GPU).lower()
    if env.get("GPU_MEMORY_GB"):
        return name, float(env["GPU_MEMORY_GB"]) * 1e9
    if name not in GPU_MEMORY_GB:
        raise ValueError(f"GPU_TYPE={name!r} is not in the memory table ({', '.join(GPU_MEMORY_GB)}); "
                         "set GPU_MEMORY_GB")
    return name, GPU_MEMORY_GB[name] * 1e9


def slurm_time_limit_s(job: str, env: dict[str, str], slurm_dir: Path) -> int | None:
    """The time limit the job will get: SBATCH_TIMELIMIT, else the wrapper's #SBATCH --time."""
    text = env.get("SBATCH_TIMELIMIT")
    if text is None:
        wrapper = slurm_dir / f"{job}.sh"
        match = re.search(r"^#SBATCH --time=(\S+)", wrapper.read_text(), re.M) if wrapper.is_file() else None
        text = match.group(1) if match else None
    return parse_slurm_time(text) if text else None


def parse_slurm_time(text: str) -> int:
    """SLURM's [days-]hours:minutes:seconds, hours:minutes:seconds, minutes:seconds or minutes."""
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    parts = [int(p) for p in rest.split(":")]
    if "-" in text:  # days-hours[:minutes[:seconds]]
        parts += [0] * (3 - len(parts))
        h, m, s = parts
    else:
        h, m, s = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days) * 24 + h) * 60 + m) * 60 + s


def time_plan(args, teacher, *, tokens_per_step: int, seq_length: int, iters: int | None, world_size: int,
              gpu: str, mfu: float, time_limit_s: int | None, checkpointing: bool,
              communication_s: float = 0.0, pp: int = 1, micro_batches: int = 1, virtual: int = 1) -> dict:
    """Step and wall time: compute from FLOPs at an assumed MFU + communication_s (the part of
    the step's communication not hidden behind compute, train/launch/comms.py); chained jobs
    under the time limit. pp > 1: the compute of a pipeline of pp stages over `micro_batches`
    per step, bubble included, virtual stages per rank (interleaved 1F1B) (the module docstring)."""
    from train.models.registry import flops_per_token

    flops = flops_per_token(args, seq_length) * (4 / 3 if checkpointing else 1)  # recompute: +1 forward
    if teacher is not None:
        flops += flops_per_token(teacher, seq_length) / 3  # the teacher's forward only
    peak = peak_flops_for_name(gpu)
    out = {"flops_per_step": flops * tokens_per_step, "assumed_mfu": mfu, "gpu_peak_flops": peak}
    if peak is None:
        return out
    compute_s = flops * tokens_per_step / (world_size * peak * mfu)
    if pp > 1:  # 1F1B: m + p - 1 slots for m micro-batches' work; interleaved: v m + p - 1 slots of 1/v
        bubble = (pp - 1) / (virtual * micro_batches + pp - 1)
        out.update(pipeline_bubble=bubble, bubble_s=compute_s * (pp - 1) / (virtual * micro_batches))
        compute_s += out["bubble_s"]
    step_s = compute_s + communication_s
    out.update(compute_s=compute_s, communication_s=communication_s, step_s=step_s)
    if iters:
        out["wall_s"] = step_s * iters
        if time_limit_s:
            usable = max(time_limit_s - SIGNAL_MARGIN_S, 1)
            out.update(time_limit_s=time_limit_s, chained_jobs=math.ceil(out["wall_s"] / usable))
    return out


def hf_config(directory) -> dict | None:
    path = Path(directory) / "config.json" if directory else None
    return json.loads(path.read_text()) if path and path.is_file() else None


def checkpoint_bytes(config: dict | None) -> int:
    """Bytes per element of an HF checkpoint from its config.json's dtype (default bf16)."""
    dtype = str((config or {}).get("dtype") or (config or {}).get("torch_dtype") or "bfloat16")
    return 4 if "32" in dtype else 2


def format_bytes(value: float) -> str:
    return f"{value / 1e9:.1f} GB"


def describe(memory: dict[str, float], capacity: float, gpu: str) -> str:
    """'parameters 32.8 GB, ...; peak 222.0 GB per GPU, h100 has 80.0 GB' (the peak is no sum:
    gradients and activations peak at different moments of a step)."""
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in memory.items() if k != "total" and v)
    return f"{parts}; peak {format_bytes(memory['total'])} per GPU, {gpu} has {format_bytes(capacity)}"


# ----------------------------------------------------------------- a job's plan

def job_models(job: str, cfg: JobConfig):
    """(student ModelArgs, teacher ModelArgs or None, teacher bytes per element); None when unknown.
    From the HF config.json when the directory is readable here, else the registry by name."""
    from train.models.hf_adapters import args_from_hf_config
    from train.models.registry import args_for_display_name

    def args_for(directory, name: str):
        config = hf_config(directory)
        if config is not None:
            try:
                return args_from_hf_config(config, name=f"hf:{Path(directory).name}"), config
            except (KeyError, TypeError, ValueError):  # a config.json the job itself refuses, later
                pass
        return args_for_display_name(name), None

    student, _ = args_for(cfg.model.hf_checkpoint, str(cfg.model.name))
    if job != "qad":
        return student, None, 2
    teacher, config = args_for(cfg.distill.teacher_checkpoint, str(cfg.distill.teacher_model))
    return student, teacher, checkpoint_bytes(config)


def plans_fsdp_mixed_precision(cfg: JobConfig) -> bool:
    """FSDP2's MixedPrecisionPolicy as the job on GPUs resolves it (auto: on for PRECISION=bf16)."""
    from train.parallel.checks import fsdp_mixed_precision_on

    return fsdp_mixed_precision_on(cfg.parallel.fsdp_mixed_precision, cfg.training.precision, cuda=True)


def job_memory(job: str, cfg: JobConfig, layout: Split, models) -> dict[str, float] | None:
    student, teacher, teacher_bytes = models
    if student is None:
        return None
    mbs = int(cfg.training.micro_batch_size)
    gbs = int(cfg.training.global_batch_size or mbs * layout.dp)
    accumulation = max(gbs // (mbs * layout.dp), 1)
    targets = [name.strip() for name in str(cfg.lora.target_modules).split(",") if name.strip()]
    lora = (int(cfg.lora.rank), targets) if job == "finetune" else None
    student_stages = pipeline_stages(student, layout.pp, layout.pipeline_layers, accumulation, layout.virtual)
    teacher_stages = teacher_pipeline_stages(student, teacher, layout)
    stages = [memory_breakdown(
        student, job=job, layout=layout, mbs=int(cfg.training.micro_batch_size), seq_length=int(cfg.data.seq_length),
        param_bytes=2 if cfg.model.param_dtype == "bfloat16" else 4,
        act_bytes=2 if cfg.training.precision == "bf16" else 4,
        checkpointing=bool(cfg.parallel.activation_checkpointing), accumulation=accumulation, teacher=teacher,
        teacher_bytes=teacher_bytes, lora=lora, distill_rows=int(cfg.distill.chunk_size),
        fsdp_mixed_precision=plans_fsdp_mixed_precision(cfg), stage=stage, teacher_stage=teacher_stage)
        for stage, teacher_stage in zip(student_stages, teacher_stages)]
    if job == "pretrain" and not cfg.model.hf_checkpoint:
        for memory, stage in zip(stages, student_stages):
            with_initialization(memory, stage)
    return max(stages, key=lambda memory: memory["total"])  # PP: the stage that needs the most


def with_initialization(memory: dict[str, float], stage: Stage) -> None:
    """A model without HF weights (pretraining from scratch, or resumed from its own DCP
    checkpoint) is initialized on every GPU in fp32 before FSDP2, TP or EP keep the rank's part
    (train/engine.py build_job_model; under PP each stage initializes its own blocks alone:
    train/models/build.py init_weights): a moment of its own at the start, before any gradient or
    AdamW state exists, which the peak covers too."""
    memory["initialization"] = sum(stage.groups.values()) * 4.0
    memory["total"] = max(memory["total"], memory["initialization"] + OVERHEAD_BYTES)


def teacher_pipeline_stages(student, teacher, layout: Split) -> list[Stage | None]:
    """The QAD teacher's share on each pipeline stage (train/parallel/pipeline.py split_model: the
    student's blocks per stage, balanced for a teacher of another depth); None: the whole teacher
    (PP_SIZE=1), or no teacher."""
    if teacher is None or layout.pp == 1:
        return [None] * layout.pp
    spec = layout.pipeline_layers if teacher.num_layers == student.num_layers else ""
    return pipeline_stages(teacher, layout.pp, spec)


def job_communication(job: str, cfg: JobConfig, layout: Split, models, link: Interconnect) -> dict | None:
    """The communication plan (train/launch/comms.py) of one optimizer step; None without model shapes."""
    student, teacher, teacher_bytes = models
    if student is None:
        return None
    mbs = int(cfg.training.micro_batch_size)
    param_bytes = 2 if cfg.model.param_dtype == "bfloat16" else 4
    shape = StepShape(layout.tp, layout.ep, layout.dp, layout.strategy, mbs * int(cfg.data.seq_length),
                      accumulation=max(int(cfg.training.global_batch_size or mbs * layout.dp) // (mbs * layout.dp), 1),
                      param_bytes=param_bytes, act_bytes=2 if cfg.training.precision == "bf16" else 4,
                      gather_bytes=2 if plans_fsdp_mixed_precision(cfg) else param_bytes,
                      checkpointing=bool(cfg.parallel.activation_checkpointing), interleaved=layout.virtual > 1)
    targets = [name.strip() for name in str(cfg.lora.target_modules).split(",") if name.strip()]
    trainable = lora_elements(student, int(cfg.lora.rank), targets) if job == "finetune" else None
    stages = pipeline_stages(student, layout.pp, layout.pipeline_layers, shape.accumulation, layout.virtual)
    plans = [communication_plan(step_collectives(student, shape, teacher=teacher, teacher_bytes=teacher_bytes,
                                                 lora_trainable=trainable, groups=stage.groups, layers=stage.layers,
                                                 stage=index, pp=layout.pp, virtual=layout.virtual), link)
             for index, stage in enumerate(stages)]
    return max(plans, key=lambda plan: plan["seconds"])  # PP: the stage that waits longest


def job_split(cfg: JobConfig, data_parallel: int) -> Split:
    parallel = cfg.parallel
    return Split(int(parallel.tensor_parallel_size), int(parallel.expert_parallel_size), data_parallel,
                 str(parallel.data_parallel), int(parallel.pipeline_parallel_size), str(parallel.pipeline_layers),
                 int(parallel.virtual_stages))


def resource_plan(job: str, cfg: JobConfig, env: dict[str, str], world_size: int, data_parallel: int, gbs: int,
                  iters: int | None, slurm_dir: Path, gpus_per_node: int) -> dict:
    """The plan's "resources": memory per GPU by category against the GPU's, the communication
    and the time (compute at the assumed MFU + the communication not overlapped)."""
    gpu, capacity = gpu_memory_bytes(env)
    link = interconnect(env, gpus_per_node)
    models = job_models(job, cfg)
    split = job_split(cfg, data_parallel)
    memory = job_memory(job, cfg, split, models)
    accumulation = gbs // (int(cfg.training.micro_batch_size) * data_parallel)
    out = {"gpu": gpu, "gpu_memory_bytes": capacity, "memory_per_gpu_bytes": memory,
           "fits": memory is None or memory["total"] <= capacity,
           "tokens_per_step": gbs * int(cfg.data.seq_length),
           "accumulation_steps": accumulation,
           "total_tokens": gbs * int(cfg.data.seq_length) * iters if iters else None}
    if models[0] is not None:
        out["communication"] = job_communication(job, cfg, split, models, link)
        mfu = float(env.get("ASSUMED_MFU") or DEFAULT_MFU)
        out["time"] = time_plan(models[0], models[1], tokens_per_step=out["tokens_per_step"],
                                seq_length=int(cfg.data.seq_length), iters=iters, world_size=world_size, gpu=gpu,
                                mfu=mfu, time_limit_s=slurm_time_limit_s(job, env, slurm_dir),
                                checkpointing=bool(cfg.parallel.activation_checkpointing),
                                communication_s=out["communication"]["exposed_s"], pp=split.pp,
                                micro_batches=accumulation, virtual=split.virtual)
    return out


def fitting_alternatives(job: str, cfg: JobConfig, world_size: int, capacity: float) -> list[str]:
    """The single knobs that would bring the plan under `capacity`, each with its total."""
    models = job_models(job, cfg)
    parallel, training = cfg.parallel, cfg.training
    tries = []
    if parallel.data_parallel != "fsdp":
        tries.append(("DP_SHARDING=fsdp", "parallel.data_parallel", "fsdp"))
    if not parallel.activation_checkpointing:
        tries.append(("ACTIVATION_CHECKPOINTING=1", "parallel.activation_checkpointing", True))
    if training.micro_batch_size > 1:
        tries.append((f"MBS={training.micro_batch_size // 2}", "training.micro_batch_size",
                      training.micro_batch_size // 2))
    if world_size % (2 * parallel.tensor_parallel_size) == 0:
        tries.append((f"TP_SIZE={2 * parallel.tensor_parallel_size}", "parallel.tensor_parallel_size",
                      2 * parallel.tensor_parallel_size))
    found = []
    for label, key, value in tries:
        variant = copy.deepcopy(cfg)
        section, name = key.split(".")
        setattr(getattr(variant, section), name, value)
        dp = world_size // (variant.parallel.tensor_parallel_size * variant.parallel.pipeline_parallel_size)
        memory = job_memory(job, variant, job_split(variant, dp), models)
        if memory is not None and memory["total"] <= capacity:
            found.append(f"{label} ({format_bytes(memory['total'])})")
    return found


def resource_summary(resources: dict) -> str:
    """One line for the launcher and the job log: memory per GPU, step and wall time, jobs."""
    memory = resources["memory_per_gpu_bytes"]
    head = "memory per GPU: unknown (no model shapes)" if memory is None else \
        f"memory per GPU {format_bytes(memory['total'])} of {resources['gpu']}'s " \
        f"{format_bytes(resources['gpu_memory_bytes'])}"
    time = resources.get("time") or {}
    parts = [head, f"{resources['tokens_per_step']:,} tokens/step ({resources['accumulation_steps']} accumulation)"]
    if "step_s" in time:
        bubble = f", pipeline bubble {time['pipeline_bubble']:.0%} of it" if "pipeline_bubble" in time else ""
        parts.append(f"~{time['step_s']:.2f} s/step (compute {time['compute_s']:.2f} at MFU {time['assumed_mfu']:g}"
                     f"{bubble}, communication {time['communication_s']:.2f})")
    if "wall_s" in time:
        parts.append(f"~{time['wall_s'] / 3600:.1f} h in all")
    if "chained_jobs" in time:
        parts.append(f"{time['chained_jobs']} job(s) of {time['time_limit_s'] / 3600:g} h")
    return "; ".join(parts)
