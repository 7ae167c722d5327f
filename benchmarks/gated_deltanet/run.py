"""Gated DeltaNet forms vs full attention at sequence 4096: `python benchmarks/gated_deltanet/run.py`.

The token-mixing core only (no projections), forward + backward (--forward-only: inference,
no autograd), same q/k/v for all:
  chunk      our chunked gated delta rule (pure PyTorch, chunk 64)
  recurrent  our token-by-token reference
  attention  causal softmax attention (torch SDPA), the O(T^2) mixer of the full layers
  fla        flash-linear-attention's Triton chunk kernel (CUDA only, when installed)
Each candidate runs in its own process so that peak memory is its own: on CPU the growth of
the peak resident set over the inputs (ru_maxrss), on CUDA torch.cuda.max_memory_allocated.
Prints a Markdown table (ms per step, tokens/s, ratio to chunk, peak MiB). `--help` for the knobs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing

CANDIDATES = ("chunk", "recurrent", "attention", "fla")


def inputs(options, device):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (options.batch, options.seq_len, options.heads)
    q, k, v = (torch.randn(*shape, options.head_dim, generator=gen) for _ in range(3))
    g = -torch.rand(*shape, generator=gen)  # log-decay in (-1, 0]
    beta = torch.rand(*shape, generator=gen)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return [x.to(device=device, dtype=dtype if x.dim() == 4 else torch.float32).requires_grad_(not options.forward_only)
            for x in (q, k, v, g, beta)]


def step_function(name: str):
    import torch.nn.functional as F

    from train.models.common import gated_deltanet as gdn

    if name == "chunk":
        return gdn.chunk_gated_delta_rule
    if name == "recurrent":
        return gdn.recurrent_gated_delta_rule
    if name == "attention":
        def attention(q, k, v, g, beta):  # (B, T, H, d) -> (B, H, T, d) for SDPA
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True)
        return attention
    if name == "fla":
        kernel = gdn.fla_chunk_gated_delta_rule()
        return lambda q, k, v, g, beta: kernel(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0]
    raise ValueError(name)


def worker(options) -> dict:
    """One candidate in this process: median seconds per forward+backward and peak memory."""
    import torch

    torch.set_num_threads(options.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors = inputs(options, device)
    step = step_function(options.worker)
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_bytes = torch.cuda.memory_allocated()
    seconds = []
    for index in range(options.warmup + options.rounds):
        synchronize()
        start = time.perf_counter()
        with torch.set_grad_enabled(not options.forward_only):
            out = step(*tensors)
        if not options.forward_only:
            out.float().square().mean().backward()
        synchronize()
        if index >= options.warmup:
            seconds.append(time.perf_counter() - start)
        for x in tensors:
            x.grad = None
    if device == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - baseline_bytes) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024
    return dict(name=options.worker, device=device, seconds=sorted(seconds)[len(seconds) // 2], peak_mib=peak_mib)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forward-only", action="store_true", help="inference: no autograd graph")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per candidate (1: on a shared 2-core machine 2 threads oversubscribe)")
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated candidates")
    parser.add_argument("--worker", choices=CANDIDATES, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        print(json.dumps(worker(options)))
        return 0

    import torch

    from train.models.common.gated_deltanet import fla_chunk_gated_delta_rule

    wanted = [name for name in options.only.split(",") if name]
    if "fla" in wanted and not (torch.cuda.is_available() and fla_chunk_gated_delta_rule() is not None):
        print("fla: skipped (needs CUDA and flash-linear-attention)", file=sys.stderr)
        wanted.remove("fla")
    forwarded = [f"--{key.replace('_', '-')}={value}" for key, value in vars(options).items()
                 if key not in ("only", "worker", "forward_only")] + (["--forward-only"] if options.forward_only else [])
    results = []
    for name in wanted:
        done = subprocess.run([sys.executable, __file__, f"--worker={name}", *forwarded],
                              capture_output=True, text=True)
        if done.returncode:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    tokens = options.batch * options.seq_len
    reference = next((r["seconds"] for r in results if r["name"] == "chunk"), None)
    print(f"B={options.batch} T={options.seq_len} H={options.heads} d={options.head_dim}, "
          f"{'forward only' if options.forward_only else 'forward+backward'}, "
          f"device {results[0]['device'] if results else '?'}, {options.threads} threads")
    print("| mixer | ms/step | tokens/s | time vs chunk | peak MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['seconds'] / reference:.2f}x" if reference else "-"
        print(f"| {r['name']} | {r['seconds'] * 1e3:.1f} | {tokens / r['seconds']:,.0f} | {ratio} | {r['peak_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
