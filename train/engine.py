"""The steps every job shares: plan and process group, model, parallelism, data, loop."""

import logging
from functools import partial

import torch

from train.config import JobConfig, ModelConfig, to_job_config
from train.data.job_datasets import build_train_dataset
from train.launch.job import fail, start_job
from train.parallel import ParallelLayout, parallelize

log = logging.getLogger("train")


def job_config(composed) -> JobConfig:
    """The composed DictConfig as the typed JobConfig, once, right after Hydra; a key the
    schema does not know, a wrong type or a `???` left is one error line naming the key."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return to_job_config(composed)
    except OmegaConfBaseException as error:
        fail(f"the config does not compose: {str(error).splitlines()[0]} ({error.full_key})")


def master_dtype(model_cfg: ModelConfig) -> torch.dtype:
    """The dtype of the weights a job trains, and so of their gradients and AdamW state.

    fp32 whatever the checkpoint holds: real HF checkpoints are bf16, and bf16 has 8 significant
    bits, so an update below ~|w| / 512 (2e-5 at |w| = 0.01) rounds back to w and a QAD run at
    LR 1e-6 would change almost no weight. bf16 only when model.param_dtype=bfloat16 asks for it."""
    return torch.bfloat16 if model_cfg.param_dtype == "bfloat16" else torch.float32


def from_hf_weights(cfg: JobConfig, ctx) -> bool:
    """Whether the model's weights come from model.hf_checkpoint (else: seeded initialization)."""
    return bool(cfg.model.hf_checkpoint) and ctx.plan.resume.decision != "from_scratch"


def build_job_model(cfg: JobConfig, ctx):
    """The model on this rank's device in master_dtype: from HF weights, or seeded initialization."""
    from train.models import build_model, load_hf, stored_dtype

    dtype = master_dtype(cfg.model)
    if from_hf_weights(cfg, ctx):
        model = load_hf(cfg.model.hf_checkpoint, dtype, device=ctx.device)
        log.info("weights from %s: stored in %s, trained in %s (model.param_dtype)", cfg.model.hf_checkpoint,
                 str(stored_dtype(cfg.model.hf_checkpoint)).removeprefix("torch."), str(dtype).removeprefix("torch."))
    else:
        model = build_model(str(cfg.model.name), device="meta",
                            attention_backend=cfg.model.attention_backend)
        initialize_model(model, cfg, ctx)
    return model


def initialize_model(model, cfg: JobConfig, ctx):
    """A meta-device model (or pipeline stage) on this rank's device, seeded from model.init_seed
    piece by piece (train/models/build.py init_weights), in master_dtype."""
    from train.models import init_weights

    model.to_empty(device=ctx.device)
    init_weights(model, cfg.model.init_seed)
    return model.to(master_dtype(cfg.model))


def sharded_job_model(cfg: JobConfig, ctx):
    """A model from HF weights (pretraining, the QAD student, the LoRA base): built on the meta
    device in master_dtype, with the function
    that fills this rank's part of each tensor once parallelize has laid it out
    (train/parallel/sharded_load.py): no rank holds the whole model unless DDP replicates it."""
    from train.models import build_model, hf_args, stored_dtype
    from train.parallel import load_hf_sharded

    path, dtype = cfg.model.hf_checkpoint, master_dtype(cfg.model)
    model = build_model(hf_args(path), device="meta", dtype=dtype, attention_backend=cfg.model.attention_backend)
    log.info("weights from %s: stored in %s, trained in %s (model.param_dtype), each rank reads its part", path,
             str(stored_dtype(path)).removeprefix("torch."), str(dtype).removeprefix("torch."))
    return model, partial(load_hf_sharded, path=path, dtype=dtype, device=ctx.device)


def sharded_lora_model(cfg: JobConfig, model, materialize):
    """The LoRA adapters added on the meta-device base of sharded_job_model, and `materialize`
    extended to start them where apply_lora starts them on a whole model: from rank 0's
    generator state (the values of one process, and of DDP's broadcast), each rank copying its
    part; fp32 whatever the base's dtype (dtype=None keeps each parameter's own)."""
    from train.lora import apply_lora, initial_adapters

    state = [torch.get_rng_state()]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(state, src=0)
    model = apply_lora(model, cfg.lora)
    return model, partial(materialize, dtype=None, initial=initial_adapters(model, state[0]))


def loads_sharded(job: str, cfg: JobConfig, ctx, layout: ParallelLayout) -> bool:
    """Whether the model comes from HF weights read in parts by each rank (sharded_model_path):
    pretraining from HF always; the QAD student and the LoRA base (quantized or not) wherever no
    DDP wrapper replicates them: under FSDP2 (any TP, EP), TP (which composes with FSDP2 only)
    or PP (each stage reads its blocks, calibrates them on the activations of the stage before:
    train/quant/student.py). Under DDP/zero1 without PP (replicated anyway; quantizers and
    adapters must go in before DDP wraps the model) and on one process they load whole
    (whole_model_path). LoRA refuses TP (train/parallel/apply.py)."""
    if not from_hf_weights(cfg, ctx):
        return False
    fsdp = layout.dp_size > 1 and cfg.parallel.data_parallel in ("fsdp", "fsdp_zero2")
    return job == "pretrain" or fsdp or layout.tp > 1 or layout.pp > 1


def add_adapters(model, cfg: JobConfig):
    """The LoRA adapters on a whole (maybe fake-quantized) base, rank 0's on every rank: each rank
    draws its own, then rank 0's are broadcast, as DDP's wrapper did (pipeline stages have none);
    a bad lora.* key is one error line."""
    from train.lora import apply_lora

    try:
        model = apply_lora(model, cfg.lora)
    except ValueError as error:
        fail(str(error))
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                torch.distributed.broadcast(parameter.data, src=0)
    return model


def quantize_job_model(job: str, model, cfg: JobConfig, ctx, dataset, layout: ParallelLayout):
    """The QAD student fake-quantized with quant.recipe, a LoRA base with lora.quantized_base:
    calibrated in a fresh run, its quantizers restored from the checkpoint on resume
    (train/quant/student.py). Returns (model, checkpoint_files): {quantizer_state.pt: record}, or
    {} when nothing is quantized."""
    from train.lora import quantized_base_recipe
    from train.quant.student import QUANTIZER_STATE_FILE, prepare_student

    if job not in ("qad", "finetune"):
        return model, {}
    resume_dir = ctx.plan.resume.path if ctx.plan.resume.decision == "resume" else None
    recipe = quantized_base_recipe(cfg.lora) if job == "finetune" else None
    try:
        model, record = prepare_student(model, cfg, resume_dir, dataset, layout, recipe=recipe)
    except ValueError as error:
        fail(str(error))
    return model, {} if record is None else {QUANTIZER_STATE_FILE: record}


def whole_model_path(job: str, cfg: JobConfig, ctx, layout: ParallelLayout, dataset):
    """Every rank holds the whole model (load_hf, or seeded initialization), quantizes it and adds
    the adapters, then parallelize splits it; under PP a model without HF weights is built on
    meta and each stage initializes its own blocks (the whole model's values). Returns (model,
    checkpoint_files)."""
    if layout.pp > 1 and job == "pretrain" and not from_hf_weights(cfg, ctx):
        from train.models import build_model

        model = build_model(str(cfg.model.name), device="meta", attention_backend=cfg.model.attention_backend)
        model = parallelize(model, cfg.parallel, layout.mesh, layout.device, precision=cfg.training.precision,
                            initialize=partial(initialize_model, cfg=cfg, ctx=ctx))
        return model, {}
    model, checkpoint_files = quantize_job_model(job, build_job_model(cfg, ctx), cfg, ctx, dataset, layout)
    if job == "finetune":
        model = add_adapters(model, cfg)
    model = parallelize(model, cfg.parallel, layout.mesh, layout.device, precision=cfg.training.precision)
    return model, checkpoint_files


def sharded_model_path(job: str, cfg: JobConfig, ctx, layout: ParallelLayout, dataset):
    """Built on meta (LoRA adapters added there too), laid out by parallelize, which has each rank
    read its part; then quantized and calibrated as laid out, a LoRA base with its adapters
    hidden, so its quantizers and record are the whole path's. Returns (model, checkpoint_files)."""
    from train.lora import adapters_hidden

    model, materialize = sharded_job_model(cfg, ctx)
    if job == "finetune":
        try:
            model, materialize = sharded_lora_model(cfg, model, materialize)
        except ValueError as error:
            fail(str(error))
    model = parallelize(model, cfg.parallel, layout.mesh, layout.device, materialize=materialize,
                        precision=cfg.training.precision)
    with adapters_hidden(model):
        return quantize_job_model(job, model, cfg, ctx, dataset, layout)


def job_vocab_size(cfg: JobConfig, ctx) -> int:
    """The vocabulary of the model build_job_model or sharded_job_model builds: the HF
    checkpoint's config.json, or the registry entry of model.name."""
    from train.models import get_model_args, hf_args

    if from_hf_weights(cfg, ctx):
        return hf_args(cfg.model.hf_checkpoint).vocab_size
    return get_model_args(str(cfg.model.name)).vocab_size


def run_job(job: str, cfg: JobConfig, loss_fn=None, make_loss_fn=None) -> str:
    """loss_fn(model, inputs, targets, mask), or make_loss_fn(layout) that returns one (a loss that
    needs the job's parallel layout: the QAD teacher goes on the student's mesh)."""
    from train.trainer import Trainer

    ctx = start_job(job, cfg)
    layout = ParallelLayout.build(ctx, cfg.parallel)  # once: everything below gets this one
    if make_loss_fn is not None:
        loss_fn = make_loss_fn(layout)
    torch.manual_seed(cfg.training.seed + ctx.rank)
    dataset = build_train_dataset(cfg, ctx, job_vocab_size(cfg, ctx))
    model_path = sharded_model_path if loads_sharded(job, cfg, ctx, layout) else whole_model_path
    model, checkpoint_files = model_path(job, cfg, ctx, layout, dataset)  # files: {name: object} in every checkpoint
    ctx.mark("model_built")
    trainer = Trainer(cfg, ctx, layout, model, dataset, loss_fn, checkpoint_files=checkpoint_files)
    reason = trainer.train()
    # DDP's reducer must go before the process group, and every rank must get here first:
    # otherwise a rank can hang in gloo's teardown after its peers have exited.
    del trainer, model
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return reason
