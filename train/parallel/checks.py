"""Torch-free checks of the parallel settings, for the launch plan (train/launch/plan.py) and parallelize().

    python -c "from train.parallel.checks import check_parallel_settings"   (no torch import)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from train.models.family import family_spec

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import ParallelConfig

DATA_PARALLEL_STRATEGIES = {
    "ddp": "DistributedDataParallel: full replicas, gradients all-reduced",
    "fsdp": "FSDP2 fully_shard per block and root; parameters resharded after forward (ZeRO-3)",
    "fsdp_zero2": "FSDP2 with reshard_after_forward=False: parameters stay gathered until backward (ZeRO-2)",
    "zero1": "DDP plus ZeroRedundancyOptimizer: optimizer state sharded over data-parallel ranks",
}


class ParallelSettingsError(ValueError):
    """A parallel setting that cannot work; the message names the variable."""


def fsdp_mixed_precision_on(setting, precision: str, cuda: bool) -> bool:
    """parallel.fsdp_mixed_precision (FSDP_MIXED_PRECISION) resolved for a run that shards with
    FSDP2: auto is on for bf16 runs (training.precision=bf16) on CUDA, off on the CPU (bf16
    autocast there, if asked); true/1 and false/0 as given. ParallelSettingsError for another value."""
    value = str(setting).strip().lower()
    if value == "auto":
        return cuda and precision == "bf16"
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ParallelSettingsError(f"parallel.fsdp_mixed_precision={setting!r} (FSDP_MIXED_PRECISION): use auto, 1 or 0")


def check_parallel_settings(parallel_cfg: ParallelConfig, model_args=None, world_size: int | None = None,
                            num_experts: int | None = None) -> None:
    """Raises ParallelSettingsError; model_args (train.models.registry.ModelArgs) adds the TP shape checks.

    num_experts: the model's routed experts (0: dense; None: model_args.num_experts, or unknown).
    These are the checks of a plan; check_engine_support adds what this engine cannot run yet.
    """
    strategy = parallel_cfg.data_parallel
    fsdp_mixed_precision_on(parallel_cfg.fsdp_mixed_precision, "fp32", False)  # a known value
    if strategy not in DATA_PARALLEL_STRATEGIES:
        raise ParallelSettingsError(f"parallel.data_parallel={strategy!r} (DP_SHARDING): use one of "
                                    f"{', '.join(DATA_PARALLEL_STRATEGIES)}")
    tp = parallel_cfg.tensor_parallel_size
    check_pipeline_parallel(parallel_cfg, model_args)
    check_expert_parallel(parallel_cfg, model_args, world_size, num_experts)
    if tp > 1 and world_size is not None and world_size // tp > 1 and strategy in ("ddp", "zero1"):
        # DDP cannot reduce DTensor gradients; FSDP2 composes with TP on a 2-D mesh.
        raise ParallelSettingsError(f"TP_SIZE={tp} with data-parallel size {world_size // tp}: "
                                    f"parallel.data_parallel={strategy!r} does not compose with tensor "
                                    "parallelism; use fsdp or fsdp_zero2")
    if tp > 1 and model_args is not None and not family_spec(model_args.family).tensor_parallel:
        raise ParallelSettingsError(f"TP_SIZE={tp}: tensor parallelism is not implemented for the "
                                    f"{model_args.family} family (model {model_args.name}); use TP_SIZE=1 with "
                                    "DP_SHARDING=fsdp")
    if tp > 1 and model_args is not None:
        # Heads split whole across TP ranks (query head h reads KV head h // (H / KV) on the same
        # rank); the MLP splits its hidden dimension; a Gated DeltaNet (qwen3_next) splits its key
        # heads, each with its r = value/key adjacent value heads (train/parallel/tensor_parallel.py).
        names = ["num_heads", "num_kv_heads", "intermediate_size"]
        if family_spec(model_args.family).hybrid:
            names += ["linear_num_key_heads", "linear_num_value_heads"]
        for name in names:
            value = getattr(model_args, name)
            if value % tp:
                raise ParallelSettingsError(f"TP_SIZE={tp} does not divide {name}={value} of model "
                                            f"{model_args.name}")


PIPELINE_SCHEDULES = {
    "1f1b": "torch's Schedule1F1B: one stage per rank",
    "interleaved_1f1b": "torch's ScheduleInterleaved1F1B: parallel.virtual_stages stages per rank, rank r holding "
                        "stages r, r + PP_SIZE, ...; a bubble 1/virtual_stages of 1F1B's for more sends",
}


def check_pipeline_parallel(parallel_cfg: ParallelConfig, model_args=None) -> None:
    """PP_SIZE > 1 (every family, tied embeddings, TP, EP and FSDP2 inside a stage, interleaved or
    not): without ZeRO-1, a known schedule, and a layer split that gives every stage at least one block."""
    pp = parallel_cfg.pipeline_parallel_size
    if pp < 1:
        raise ParallelSettingsError(f"PP_SIZE={pp} must be at least 1")
    check_pipeline_schedule(parallel_cfg)
    if pp == 1:
        return
    if parallel_cfg.data_parallel == "zero1":
        # ZeroRedundancyOptimizer shards over every rank, and the stages hold different parameters
        raise ParallelSettingsError(f"PP_SIZE={pp} with parallel.data_parallel='zero1' (DP_SHARDING): use ddp, fsdp "
                                    "or fsdp_zero2")
    if model_args is None:
        return
    pipeline_layers(model_args.num_layers, pp, parallel_cfg.pipeline_layers, parallel_cfg.virtual_stages)


def check_pipeline_schedule(parallel_cfg: ParallelConfig) -> None:
    """parallel.pipeline_schedule is known and parallel.virtual_stages fits it (1f1b: 1; interleaved: 2+)."""
    schedule, virtual = parallel_cfg.pipeline_schedule, parallel_cfg.virtual_stages
    if schedule not in PIPELINE_SCHEDULES:
        raise ParallelSettingsError(f"parallel.pipeline_schedule={schedule!r} (PP_SCHEDULE): use one of "
                                    f"{', '.join(PIPELINE_SCHEDULES)}")
    if schedule == "1f1b" and virtual != 1:
        raise ParallelSettingsError(f"parallel.virtual_stages={virtual} (PP_VIRTUAL_STAGES) with "
                                    "parallel.pipeline_schedule='1f1b': 1F1B runs one stage per rank; use 1, or "
                                    "PP_SCHEDULE=interleaved_1f1b")
    if schedule == "interleaved_1f1b" and virtual < 2:
        raise ParallelSettingsError(f"parallel.virtual_stages={virtual} (PP_VIRTUAL_STAGES) with "
                                    "parallel.pipeline_schedule='interleaved_1f1b': interleaving needs at least 2 "
                                    "stages per rank")


def pipeline_layers(num_layers: int, pp: int, spec: str = "", virtual: int = 1) -> list[int]:
    """Blocks per stage, pp x virtual stages (virtual: parallel.virtual_stages; stage s on rank
    s % pp): parallel.pipeline_layers ("3,5": 3 on stage 0, 5 on stage 1), or balanced with the
    embedding and the final norm + lm_head counted as one block each (the first and the last
    stage then hold one block less: 18 layers over 4 stages -> 4,5,5,4)."""
    stages = pp * virtual
    named = f"PP_SIZE={pp}" if virtual == 1 else f"PP_SIZE x PP_VIRTUAL_STAGES = {pp} x {virtual} = {stages}"
    if spec:
        try:
            counts = [int(part) for part in str(spec).split(",")]
        except ValueError:
            raise ParallelSettingsError(f"parallel.pipeline_layers={spec!r}: not a comma-separated list of "
                                        "integers") from None
        if len(counts) != stages or min(counts) < 1 or sum(counts) != num_layers:
            raise ParallelSettingsError(f"parallel.pipeline_layers={spec!r}: needs {named} counts of at least "
                                        f"1 that add up to the model's {num_layers} layers")
        return counts
    if num_layers < stages:
        raise ParallelSettingsError(f"{named} exceeds the model's {num_layers} layers: every stage needs a block")
    units = num_layers + 2  # blocks, plus the embedding and lm_head
    # stage s ends after unit round(units * (s + 1) / stages); unit 0 is the embedding
    ends = [min(max(round(units * (s + 1) / stages) - 1, s + 1), num_layers - (stages - 1 - s))
            for s in range(stages - 1)]
    bounds = [0, *ends, num_layers]
    return [bounds[s + 1] - bounds[s] for s in range(stages)]


def rank_stages(pp: int, virtual: int, rank: int) -> list[int]:
    """The stages pipeline rank `rank` holds, in order: rank, rank + pp, ... (torch's loop placement)."""
    return [rank + chunk * pp for chunk in range(virtual)]


def interleaved_rounds_error(pp: int, micro_batches: int) -> str | None:
    """ScheduleInterleaved1F1B's rule (torch 2.13): the micro-batches split into
    max(1, micro_batches // pp) rounds of equal size; the reason it refuses, else None."""
    rounds = max(1, micro_batches // pp)
    if micro_batches % rounds:
        return (f"interleaved 1F1B splits the {micro_batches} micro-batches per step into {rounds} rounds "
                f"(micro-batches // PP_SIZE={pp}), which must divide them; use a multiple of PP_SIZE")
    return None


def check_expert_parallel(parallel_cfg: ParallelConfig, model_args=None, world_size: int | None = None,
                          num_experts: int | None = None) -> None:
    """EP splits the experts over data-parallel ranks: it must divide both, and needs experts."""
    ep = parallel_cfg.expert_parallel_size
    if ep < 1:
        raise ParallelSettingsError(f"EP_SIZE={ep} must be at least 1")
    if ep == 1:
        return
    if num_experts is None and model_args is not None:
        num_experts = model_args.num_experts
    model = f"model {model_args.name}" if model_args is not None else "the model"
    if num_experts == 0:
        raise ParallelSettingsError(f"EP_SIZE={ep} but {model} is dense (no experts); use EP_SIZE=1")
    if num_experts and num_experts % ep:
        raise ParallelSettingsError(f"EP_SIZE={ep} does not divide the {num_experts} experts of {model}")
    if world_size is not None:
        model_parallel = parallel_cfg.tensor_parallel_size * parallel_cfg.pipeline_parallel_size
        data_parallel = world_size // model_parallel
        if data_parallel % ep:
            raise ParallelSettingsError(
                f"EP_SIZE={ep} does not divide the data-parallel size {data_parallel} ({world_size} GPUs / "
                f"TP_SIZE {parallel_cfg.tensor_parallel_size} / PP_SIZE {parallel_cfg.pipeline_parallel_size}); "
                "add nodes or lower EP_SIZE")


def check_engine_support(parallel_cfg: ParallelConfig) -> None:
    """Combinations a plan accepts (Megatron runs them) that this engine refuses at start."""
    ep = parallel_cfg.expert_parallel_size
    if ep > 1 and parallel_cfg.data_parallel == "zero1":
        # ZeroRedundancyOptimizer would broadcast each rank's local experts over all dp ranks
        raise ParallelSettingsError(f"EP_SIZE={ep} with parallel.data_parallel='zero1': use ddp, fsdp or fsdp_zero2")
