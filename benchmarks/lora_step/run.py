"""LoRA training-step tokens/s, ours vs transformers' Trainer + peft: `python benchmarks/lora_step/run.py`.

The same 50M-parameter Qwen3-like model (8L-512D, vocab 32768, untied lm_head; same initial
weights), LoRA rank 16 (alpha 32, no dropout) on q/k/v/o_proj, batch 4 x 256 chat-like
sequences (loss on the answer tokens only), one process, CPU, --precision bf16 (default:
autocast, fp32 parameters; Trainer's bf16=True) or fp32.

Ours: train.lora.apply_lora, then Trainer.train_step as the job runs it (token-weighted fused
loss, clipping folded into the fused AdamW step; benchmarks/train_throughput our_step).
Theirs: peft.get_peft_model and transformers.Trainer.train(): its own loop, optimizer
(adamw_torch), clipping and autocast, timed per step by a TrainerCallback. The candidates
alternate in rounds (shared machine): each round runs `--steps` optimizer steps of each, the
first step of each round untimed; the median step is reported. Prints a Markdown table.

--clock cpu (for a loaded, shared machine): one thread, and each step timed by the CPU time of
that thread (time.thread_time), which other processes' load does not inflate the way it inflates
wall time; on CPU autograd runs backward on the calling thread, so the whole step is counted.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing
from benchmarks.train_throughput.run import build_pair, our_step  # noqa: E402  same model pair, same step

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def chat_tokens(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, seq + 1) tokens and a (batch, seq) answer-only loss mask: a prompt of 32-160 tokens,
    the answer after it."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=generator)
    prompt = torch.randint(32, 160, (args.batch, 1), generator=generator)
    mask = (torch.arange(args.seq_len) >= prompt).float()
    return tokens, mask


def ours_lora_step(model, args, tokens, mask):
    from train.lora import apply_lora

    lora = SimpleNamespace(rank=args.rank, alpha=2 * args.rank, dropout=0.0, target_modules=",".join(TARGETS))
    model = apply_lora(model, lora)
    step = our_step(model, args.precision)
    batch = (tokens[:, :-1], tokens[:, 1:], mask)
    return lambda: step(batch)


class StepTimes:
    """A transformers TrainerCallback recording each optimizer step's wall time."""

    def __init__(self, clock):
        from transformers import TrainerCallback

        times = self.seconds = []

        class Callback(TrainerCallback):
            def on_step_begin(self, *_, **__):
                self.start = clock()

            def on_step_end(self, *_, **__):
                times.append(clock() - self.start)

        self.callback = Callback()


def hf_trainer_round(model, args, tokens, mask, output_dir: str, clock):
    """Returns run(steps) -> step seconds: Trainer.train() for `steps` optimizer steps."""
    from transformers import Trainer, TrainingArguments

    labels = tokens[:, :-1].masked_fill(torch.cat([mask[:, :1], mask[:, :-1]], 1) == 0, -100)  # HF shifts itself
    rows = [{"input_ids": tokens[i, :-1], "labels": labels[i]} for i in range(args.batch)]

    def run(steps: int) -> list[float]:
        training = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=steps,
                                     learning_rate=3e-4, weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
                                     bf16=args.precision == "bf16", use_cpu=True, report_to=[], save_strategy="no",
                                     logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                                     remove_unused_columns=False, optim="adamw_torch")
        timer = StepTimes(clock)
        Trainer(model=model, args=training, train_dataset=rows * steps, callbacks=[timer.callback]).train()
        return timer.seconds
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per round (the first untimed)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: one thread, timed by its CPU time (a loaded machine)")
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    if args.clock == "cpu":
        torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from peft import LoraConfig, get_peft_model

    hf, ours = build_pair(args)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    tokens, mask = chat_tokens(args)
    ours_step = ours_lora_step(ours, args, tokens, mask)
    hf = get_peft_model(hf, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                       target_modules=TARGETS))
    seconds = {"transformers Trainer + peft": [], "ours": []}
    with tempfile.TemporaryDirectory() as output_dir:
        hf_round = hf_trainer_round(hf, args, tokens, mask, output_dir, clock)
        for _ in range(args.rounds):
            seconds["transformers Trainer + peft"] += hf_round(args.steps)[1:]
            times = []
            for _ in range(args.steps):
                start = clock()
                ours_step()
                times.append(clock() - start)
            seconds["ours"] += times[1:]
    tokens_per_step = args.batch * args.seq_len
    rates = {name: tokens_per_step / statistics.median(values) for name, values in seconds.items()}
    base = rates["transformers Trainer + peft"]
    print(f"\nQwen3 {args.layers}L-{args.hidden}D, vocab {args.vocab} ({params:.0f}M params), LoRA r {args.rank} on "
          f"{'/'.join(name[0] for name in TARGETS)}, batch {args.batch} x {args.seq_len}, {args.precision} CPU, "
          f"{torch.get_num_threads()} threads, {args.clock} clock, median of {len(seconds['ours'])} steps in {args.rounds} rounds\n")
    print("| step | tokens/s | median step s | vs Trainer + peft |")
    print("|---|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {statistics.median(seconds[name]):.3f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
