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


def build_job_model(cfg: JobConfig, ctx):
    """The model on this rank's device in master_dtype: from HF weights, or seeded initialization."""
    from train.models import build_model, init_weights, load_hf, stored_dtype

    dtype = master_dtype(cfg.model)
    if cfg.model.hf_checkpoint and ctx.plan.resume.decision != "from_scratch":
        model = load_hf(cfg.model.hf_checkpoint, dtype, device=ctx.device)
        log.info("weights from %s: stored in %s, trained in %s (model.param_dtype)", cfg.model.hf_checkpoint,
                 str(stored_dtype(cfg.model.hf_checkpoint)).removeprefix("torch."), str(dtype).removeprefix("torch."))
    else:
        model = build_model(str(cfg.model.name), device="meta",
                            attention_backend=cfg.model.attention_backend)
        model.to_empty(device=ctx.device)
        init_weights(model, cfg.model.init_seed)
        model.to(dtype)
    return model


def sharded_job_model(cfg: JobConfig, ctx):
    """A pretrain model from HF weights: built on the meta device in master_dtype, with the function
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
    """Whether the model comes from HF weights read in parts by each rank (sharded_job_model):
    pretraining always; under FSDP2 with TP 1: the QAD student (any EP), then quantized and
    calibrated as laid out (train/quant/student.py; under EP each rank calibrates its experts on
    the rows routed to them), and the unquantized LoRA base (EP 1), its adapters added on meta
    (sharded_lora_model). A quantized LoRA base, and the student or base under DDP/zero1
    (replicated anyway) or TP, load whole and are quantized/adapted before parallelize."""
    if not cfg.model.hf_checkpoint or ctx.plan.resume.decision == "from_scratch":
        return False
    fsdp = layout.dp_size > 1 and cfg.parallel.data_parallel in ("fsdp", "fsdp_zero2")
    laid_out = fsdp and layout.tp == 1  # quantized or adapted after the load
    lora_base = job == "finetune" and layout.ep == 1 and not cfg.lora.quantized_base
    return job == "pretrain" or (laid_out and (job == "qad" or lora_base))


def add_adapters(model, cfg: JobConfig, ctx, dataset, layout: ParallelLayout):
    """Fine-tuning: the base fake-quantized when lora.quantized_base names a recipe, then the LoRA
    adapters. Returns (model, quantizer record for each checkpoint or None).

    The base is quantized exactly as a QAD student (train/quant/student.py): calibrated on the
    first quant.calibration_batches training micro-batches in a fresh run, its quantizers
    restored from the checkpoint on resume (and in validate mode), where a recipe other than
    the checkpoint's is refused. The adapters go in afterwards, unquantized."""
    from train.lora import apply_lora, quantized_base_recipe
    from train.quant.student import prepare_student

    resume_dir = ctx.plan.resume.path if ctx.plan.resume.decision == "resume" else None
    model, record = prepare_student(model, cfg, resume_dir, dataset, layout,
                                    recipe=quantized_base_recipe(cfg.lora))
    return apply_lora(model, cfg.lora), record


def run_job(job: str, cfg: JobConfig, loss_fn=None, make_loss_fn=None) -> str:
    """loss_fn(model, inputs, targets, mask), or make_loss_fn(layout) that returns one (a loss that
    needs the job's parallel layout: the QAD teacher goes on the student's mesh)."""
    from train.trainer import Trainer

    ctx = start_job(job, cfg)
    layout = ParallelLayout.build(ctx, cfg.parallel)  # once: everything below gets this one
    if make_loss_fn is not None:
        loss_fn = make_loss_fn(layout)
    torch.manual_seed(cfg.training.seed + ctx.rank)
    sharded = loads_sharded(job, cfg, ctx, layout)
    materialize = None  # from HF weights: loaded by parallelize, each rank its part
    if sharded:
        model, materialize = sharded_job_model(cfg, ctx)
    else:  # a quantized LoRA base; one process; DDP, TP: whole, quantized and adapted first
        model = build_job_model(cfg, ctx)
    vocab_size = model.args.vocab_size
    dataset = build_train_dataset(cfg, ctx, vocab_size)
    if sharded and job == "finetune":
        try:
            model, materialize = sharded_lora_model(cfg, model, materialize)
        except ValueError as error:
            fail(str(error))
    if sharded:
        model = parallelize(model, cfg.parallel, layout.mesh, layout.device, materialize=materialize)
    checkpoint_files = {}  # extra files in every checkpoint: {name: picklable object}
    if job == "qad" or job == "finetune" and not sharded:  # (a sharded LoRA base has its adapters)
        from train.quant.student import QUANTIZER_STATE_FILE, prepare_student

        resume_dir = ctx.plan.resume.path if ctx.plan.resume.decision == "resume" else None
        try:  # QAD: the fake-quantized student (calibrated, or its quantizers resumed)
            if job == "qad":
                model, record = prepare_student(model, cfg, resume_dir, dataset, layout)
            else:
                model, record = add_adapters(model, cfg, ctx, dataset, layout)
        except ValueError as error:
            fail(str(error))
        if record is not None:
            checkpoint_files[QUANTIZER_STATE_FILE] = record
    if not sharded:
        model = parallelize(model, cfg.parallel, layout.mesh, layout.device)
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
