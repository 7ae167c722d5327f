"""The steps every job shares: plan and process group, model, parallelism, data, loop."""

import logging

import torch

from train.datasets import build_train_dataset
from train.launch.job import start_job
from train.parallel import build_mesh, parallelize

log = logging.getLogger("train")


def build_job_model(cfg, ctx):
    """The model on this rank's device: from HF weights, or seeded initialization."""
    from train.models import build_model, init_weights, load_hf

    if cfg.model.get("hf_checkpoint") and ctx.plan.resume.decision != "from_scratch":
        model = load_hf(cfg.model.hf_checkpoint).to(ctx.device)
    else:
        model = build_model(str(cfg.model.name), device="meta",
                            attention_backend=cfg.model.attention_backend)
        model.to_empty(device=ctx.device)
        init_weights(model, cfg.model.init_seed)
    if cfg.model.param_dtype == "bfloat16":
        model.to(torch.bfloat16)
    return model


def calibration_batches(dataset, count: int, micro_batch_size: int, device: str) -> list[torch.Tensor]:
    """The first `count` micro-batches of the training set as token ids (B, T): quantizer calibration."""
    from train.trainer import to_batch

    return [to_batch([dataset[i] for i in range(step * micro_batch_size, (step + 1) * micro_batch_size)], device)[0]
            for step in range(count)]


def add_adapters(model, cfg, ctx, dataset):
    """Fine-tuning: fake-quantize the base when lora.quantized_base names a recipe (calibrated
    on the first quant.calibration_batches training micro-batches), then the LoRA adapters."""
    from train.lora import apply_lora, apply_quantized_base

    recipe = cfg.lora.get("quantized_base")
    if recipe and str(recipe) != "none":
        batches = calibration_batches(dataset, cfg.quant.calibration_batches, cfg.training.micro_batch_size,
                                      ctx.device)
        model = apply_quantized_base(model, str(recipe), batches)
    return apply_lora(model, cfg.lora)


def run_job(job: str, cfg, loss_fn=None) -> str:
    from train.trainer import Trainer

    ctx = start_job(job, cfg)
    torch.manual_seed(cfg.training.seed + ctx.rank)
    model = build_job_model(cfg, ctx)
    vocab_size = model.args.vocab_size
    if job == "finetune":
        dataset = build_train_dataset(cfg, ctx, vocab_size)
        model = add_adapters(model, cfg, ctx, dataset)
    model = parallelize(model, cfg.parallel, build_mesh(ctx.world_size, cfg.parallel.tensor_parallel_size,
                                                         torch.device(ctx.device).type), ctx.device)
    ctx.mark("model_built")
    if job != "finetune":
        dataset = build_train_dataset(cfg, ctx, vocab_size)
    trainer = Trainer(cfg, ctx, model, dataset, loss_fn)
    reason = trainer.train()
    # DDP's reducer must go before the process group, and every rank must get here first:
    # otherwise a rank can hang in gloo's teardown after its peers have exited.
    del trainer, model
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return reason
