"""The steps every job shares: plan and process group, model, parallelism, data, loop."""

import logging

import torch

from train.datasets import build_train_dataset
from train.launch.job import start_job
from train.parallel import apply_data_parallel

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


def run_job(job: str, cfg, loss_fn=None) -> str:
    from train.trainer import Trainer

    ctx = start_job(job, cfg)
    torch.manual_seed(cfg.training.seed + ctx.rank)
    model = build_job_model(cfg, ctx)
    vocab_size = model.args.vocab_size
    model = apply_data_parallel(model, cfg.parallel, ctx.device)
    dataset = build_train_dataset(cfg, ctx, vocab_size)
    reason = Trainer(cfg, ctx, model, dataset, loss_fn).train()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return reason
