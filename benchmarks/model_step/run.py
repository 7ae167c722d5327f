"""Forward+backward tokens/s, our Qwen3 vs transformers' Qwen3ForCausalLM: `python benchmarks/model_step/run.py`.

Same config and weights for both (8 layers, hidden 512, seq 512), CPU, eager and
torch.compile in one run; prints a Markdown table with ratios. `--help` for the knobs.
Each step is forward + next-token cross entropy + backward, each model with the loss it
trains with: transformers' `labels=` loss (ForCausalLMLoss, given the shifted labels) and
ours train.losses.language_model_loss (lm_head fused with the loss);
compile mode compiles that whole function (model and loss) for each. --precision bf16 (the
default, the training precision: training.precision=bf16) runs both under bf16 autocast with
fp32 parameters, so matrix multiplies use the CPU's bf16 units (AMX here); fp32 is the
GEMM-bound case.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing


def build_pair(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from train.models import build_model
    from train.models.hf_adapters import args_from_hf_config, from_hf_state_dict

    config = Qwen3Config(vocab_size=args.vocab, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, intermediate_size=1536,
                         max_position_embeddings=args.seq_len, rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa").train()
    model_args = args_from_hf_config(config.to_dict(), name="bench-qwen3")
    ours = build_model(model_args, device="cpu", seed=None).train()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), model_args))
    return hf, ours


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def time_interleaved(steps: dict, ids, warmup: int, rounds: int) -> dict[str, float]:
    """Median seconds per forward+backward step; the candidates alternate each round so that
    load from other processes on a shared machine hits them alike."""
    for step in steps.values():
        for _ in range(warmup):
            step(ids)
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(ids)
            seconds[name].append(time.perf_counter() - start)
    return {name: median(values) for name, values in seconds.items()}


def transformers_loss(model):
    def loss(ids):  # ids (B, T+1)
        labels = ids[:, 1:].contiguous()  # already shifted: HF uses shift_labels as given
        return model(input_ids=ids[:, :-1], labels=labels, shift_labels=labels).loss
    return loss


def our_loss(model):
    from train.losses import language_model_loss

    def loss(ids):  # ids (B, T+1)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        return language_model_loss(model, inputs, targets, torch.ones(targets.shape))
    return loss


def make_step(loss_fn, model, precision: str):
    def step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(ids)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds; the median is reported")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="bf16: autocast with fp32 parameters (training.precision=bf16)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hf, ours = build_pair(args)
    # (B, T+1): the model reads ids[:, :-1] and predicts ids[:, 1:]
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    # same weights, same logits (fp32 GEMMs may sum in another order): the comparison is like for like
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[:, :-1]), hf(ids[:, :-1]).logits, atol=1e-3, rtol=1e-3)

    losses = {"transformers": transformers_loss(hf), "ours": our_loss(ours)}
    models = {"transformers": hf, "ours": ours}
    with torch.no_grad():  # and the same loss
        torch.testing.assert_close(losses["ours"](ids), losses["transformers"](ids), atol=1e-3, rtol=1e-3)
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    results: dict[tuple[str, str], float] = {}
    for mode in modes:
        wrap = torch.compile if mode == "compile" else (lambda f: f)
        steps = {name: make_step(wrap(loss), models[name], args.precision) for name, loss in losses.items()}
        for name, seconds in time_interleaved(steps, ids, args.warmup, args.steps).items():
            results[(name, mode)] = args.batch * args.seq_len / seconds
            print(f"  {name:12s} {mode:7s} {results[(name, mode)]:9.0f} tokens/s", flush=True)

    base = results[("transformers", "eager")]
    print(f"\nQwen3 8L-512D-1536ff, 8 heads / 4 KV x 64, vocab {args.vocab}, batch {args.batch} x seq "
          f"{args.seq_len}, {args.precision} CPU, {torch.get_num_threads()} threads, median of {args.steps} interleaved steps\n")
    print("| model | mode | tokens/s | vs transformers eager | vs transformers same mode |")
    print("|---|---|---|---|---|")
    for (name, mode), tps in results.items():
        same_mode = results[("transformers", mode)]
        print(f"| {name} | {mode} | {tps:.0f} | {tps / base:.2f}x | {tps / same_mode:.2f}x |")


if __name__ == "__main__":
    main()
