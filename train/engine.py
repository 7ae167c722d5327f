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


def apply_lora(model, lora_cfg):
    """peft LoRA adapters on the named linear layers; the base weights freeze."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = [name.strip() for name in str(lora_cfg.target_modules).split(",") if name.strip()]
    config = LoraConfig(r=lora_cfg.rank, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=targets)
    model = inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = "lora_" in name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA rank %d on %s: %d trainable parameters", lora_cfg.rank, ",".join(targets), trainable)
    return model


def run_job(job: str, cfg, loss_fn=None) -> str:
    from train.trainer import Trainer

    ctx = start_job(job, cfg)
    torch.manual_seed(cfg.training.seed + ctx.rank)
    model = build_job_model(cfg, ctx)
    vocab_size = model.args.vocab_size
    if job == "finetune":
        model = apply_lora(model, cfg.lora)
    mesh = build_mesh(ctx.world_size, cfg.parallel.tensor_parallel_size, torch.device(ctx.device).type,
                      cfg.parallel.expert_parallel_size)
    model = parallelize(model, cfg.parallel, mesh, ctx.device)
    ctx.mark("model_built")
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
