"""Chunked KD loss vs the naive full-logits loss, peak memory and time: `python benchmarks/kd_loss/run.py`.

One forward + backward of KL(teacher || student) (T = 2) + 0.5 x LM loss at sequence 4096,
vocabulary 151936, hidden 1024, batch 1, fp32 (the QAD loss with Qwen3-0.6B's lm_head shape).
Inputs: student hidden states and lm_head weight (both requiring grad), teacher hidden states
and weight. naive = train.distill.loss.full_logits_loss on h @ W^T for both models (what
train/qad.py did before); chunked = train.distill.chunked.chunked_distill_loss.

Each variant runs in a subprocess of its own. After the inputs exist and a short warm-up
(sequence 128) has run, the child resets the kernel's RSS high-water mark (writing 5 to
/proc/self/clear_refs), then times one forward + backward; "peak extra" is VmHWM minus the RSS
just before the loss (the inputs, 1.3 GB, excluded), "peak RSS" the whole process. torch has
no CPU allocator statistics, and tracemalloc does not see its allocations. The naive variant
needs ~15 GB: run this on an otherwise idle machine. Prints a Markdown table and the losses
(equal to ~1e-5: the same computation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run from anywhere without installing


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(variant: str, seq: int, vocab: int, hidden_size: int, chunk_size: int) -> dict:
    import torch

    from train.config import DistillConfig
    from train.distill.chunked import chunked_distill_loss
    from train.distill.loss import full_logits_loss

    cfg = DistillConfig(temperature=2.0, lm_loss_weight=0.5)

    def inputs(length: int):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(1, length, hidden_size, generator=g).requires_grad_()
        th = torch.randn(1, length, hidden_size, generator=g)
        targets = torch.randint(0, vocab, (1, length), generator=g)
        return h, th, targets, torch.ones(1, length)

    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.02).requires_grad_()
    teacher_weight = torch.randn(vocab, hidden_size, generator=g) * 0.02

    def step(h, th, targets, mask) -> float:
        if variant == "naive":
            loss = full_logits_loss(h @ weight.T, th @ teacher_weight.T, targets, mask, cfg, None)
        else:
            loss = chunked_distill_loss(h, weight, th, teacher_weight, targets, mask, temperature=cfg.temperature,
                                        lm_loss_weight=cfg.lm_loss_weight, chunk_size=chunk_size)
        loss.backward()
        return float(loss.detach())

    step(*inputs(128))  # warm-up: thread pools, kernels
    weight.grad = None
    batch = inputs(seq)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_kb = status_kb("VmRSS")
    started = time.perf_counter()
    loss = step(*batch)
    seconds = time.perf_counter() - started
    peak_kb = status_kb("VmHWM")
    return {"variant": variant, "seconds": seconds, "loss": loss, "peak_extra_gb": (peak_kb - before_kb) / 2**20,
            "peak_rss_gb": peak_kb / 2**20, "grad_norm": float(weight.grad.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=512, help="cfg.distill.chunk_size's default")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of (naive, chunked); the median is shown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.seq, args.vocab, args.hidden, args.chunk_size)))
        return
    results: dict[str, list[dict]] = {"chunked": [], "naive": []}  # the small one first
    for _ in range(args.repeats):
        for variant in results:
            out = subprocess.run([sys.executable, __file__, "--child", variant, "--seq", str(args.seq), "--vocab",
                                  str(args.vocab), "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)],
                                 check=True, capture_output=True, text=True)
            results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"# {variant}: {results[variant][-1]}", flush=True)

    def median(variant: str, key: str) -> float:
        values = sorted(r[key] for r in results[variant])
        return values[len(values) // 2]

    naive_time, naive_mem = median("naive", "seconds"), median("naive", "peak_extra_gb")
    print(f"\nseq {args.seq}, vocab {args.vocab}, hidden {args.hidden}, batch 1, fp32, forward + backward, "
          f"chunk {args.chunk_size}, median of {args.repeats}\n")
    print("| loss | seconds | peak extra GB | peak RSS GB | time vs naive | memory vs naive |")
    print("|---|---|---|---|---|---|")
    for variant in ("naive", "chunked"):
        seconds, memory = median(variant, "seconds"), median(variant, "peak_extra_gb")
        print(f"| {variant} | {seconds:.1f} | {memory:.2f} | {median(variant, 'peak_rss_gb'):.2f} | "
              f"{seconds / naive_time:.2f}x | {memory / naive_mem:.0%} |")
    print(f"\nloss naive {results['naive'][0]['loss']:.6f}, chunked {results['chunked'][0]['loss']:.6f}; "
          f"grad norm naive {results['naive'][0]['grad_norm']:.6f}, chunked {results['chunked'][0]['grad_norm']:.6f}")


if __name__ == "__main__":
    main()
