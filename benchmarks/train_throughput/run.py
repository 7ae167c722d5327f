"""Training-step tokens/s, our model + Trainer step vs transformers Qwen3 + torch AdamW: `python benchmarks/train_throughput/run.py`.

One optimizer step each: forward, loss, backward, gradient clipping, AdamW step, zero_grad.
Ours: train/models Qwen3, Trainer.train_step (language_model_loss: lm_head fused with the
cross entropy, train/losses.py; clipping folded into the step) and build_optimizer (fused
AdamW, decay on matrices only). Theirs: transformers' Qwen3ForCausalLM (sdpa) with its
`labels=` loss, clip_grad_norm_, and torch.optim.AdamW with its defaults. Same config, same
initial weights, same batch, CPU. --precision bf16 (default; training.precision=bf16: autocast,
fp32 parameters and AdamW state, for both) or fp32. Eager, and (unless --no-compile)
compiled: transformers' model with torch.compile (its loss inside the graph), ours per block
as parallel.compile=true does (the loss stays eager). The candidates alternate every round
(shared machine); the median is reported. --profile prints the top operators of one eager
step of each. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing
from benchmarks.model_step.run import time_interleaved  # noqa: E402  same timing as the model benchmark
from train.parallel.apply import apply_compile  # noqa: E402


def build_pair(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from train.models import build_model
    from train.models.hf_adapters import args_from_hf_config, from_hf_state_dict

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 128),
                         head_dim=64, intermediate_size=3 * args.hidden, max_position_embeddings=args.seq_len,
                         rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa").train()
    model_args = args_from_hf_config(config.to_dict(), name="bench-qwen3")
    ours = build_model(model_args, device="cpu", seed=None).train()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), model_args))
    return hf, ours


def our_step(model, precision: str):
    """Trainer.train_step on a minimal stand-in for the Trainer (its default loss,
    language_model_loss), then the optimizer step as in train()."""
    from train.config import OptimConfig, ParallelConfig, TrainingConfig
    from train.losses import language_model_loss
    from train.optim import build_optimizer
    from train.parallel.layout import ParallelLayout
    from train.trainer import Trainer

    optim_cfg = OptimConfig(lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, grad_clip=1.0)
    optimizer = build_optimizer(model, optim_cfg)
    cfg = SimpleNamespace(optim=optim_cfg, training=TrainingConfig(precision=precision), parallel=ParallelConfig())
    trainer = SimpleNamespace(model=model, optimizer=optimizer, layout=ParallelLayout(1, 0, 1, 1, "cpu"), cfg=cfg,
                              loss_fn=language_model_loss)

    def step(batch):
        Trainer.train_step(trainer, iter([batch]), 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def hf_step(model, forward, precision: str):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(batch):
        inputs, targets, _ = batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=inputs, labels=inputs).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def profile(steps: dict, batch) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for name, step in steps.items():
        step(batch)  # not the first step: that one also allocates the AdamW state
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batch)
        print(f"\n### {name} (eager, one step)\n")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: autocast, fp32 parameters and AdamW state (training.precision=bf16)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hf, ours = build_pair(args)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    # ours predicts tokens[1:] from tokens[:-1]; HF gets the same sequence and shifts internally
    ours_batch = (tokens[:, :-1], tokens[:, 1:], torch.ones(args.batch, args.seq_len))
    hf_batch = (tokens[:, :-1], None, None)
    with torch.no_grad():
        torch.testing.assert_close(ours(ours_batch[0]), hf(hf_batch[0]).logits, atol=1e-3, rtol=1e-3)

    results: dict[tuple[str, str], float] = {}
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    for mode in modes:
        if mode == "compile":
            apply_compile(ours)  # what parallel.compile=true does: each block compiled in place
        steps = {"transformers": hf_step(hf, torch.compile(hf) if mode == "compile" else hf, args.precision),
                 "ours": our_step(ours, args.precision)}
        batches = {"transformers": hf_batch, "ours": ours_batch}
        if args.profile and mode == "eager":
            for name in steps:
                profile({name: steps[name]}, batches[name])
        timed = time_interleaved({n: (lambda s, b: (lambda _: s(b)))(s, batches[n]) for n, s in steps.items()},
                                 None, args.warmup, args.steps)
        for name, seconds in timed.items():
            results[(name, mode)] = args.batch * args.seq_len / seconds
            print(f"  {name:12s} {mode:7s} {results[(name, mode)]:9.0f} tokens/s", flush=True)

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"\nQwen3 {args.layers}L-{args.hidden}D, vocab {args.vocab} ({params:.0f}M params), batch {args.batch} x "
          f"seq {args.seq_len}, {args.precision} CPU, {torch.get_num_threads()} threads, full step incl. AdamW, "
          f"median of {args.steps} interleaved steps\n")
    print("| model + step | mode | tokens/s | vs transformers eager | vs transformers same mode |")
    print("|---|---|---|---|---|")
    base = results[("transformers", "eager")]
    for (name, mode), tps in results.items():
        print(f"| {name} | {mode} | {tps:.0f} | {tps / base:.2f}x | {tps / results[('transformers', mode)]:.2f}x |")


if __name__ == "__main__":
    main()
