"""Memory per rank while loading an HF checkpoint: `python benchmarks/load_memory/run.py`.

A random Qwen3 of ~0.8B parameters (transformers from a config, bf16, save_pretrained in
500 MB shards: 1.6 GB; built once, cached in --dir) loaded into fp32 parameters (master
weights) four ways, each in fresh processes:
    sharded N   train.parallel.sharded_load.load_hf_sharded on N gloo processes under FSDP2
                (N = 1: plain tensors, one process): each rank reads its rows only
    load_hf     train.models.load_hf, one process: the whole model (what every rank did before)
    transformers AutoModelForCausalLM.from_pretrained(dtype=float32), one process
Per process: the fixed overhead (RSS once torch, the process group and the meta model exist,
before the load), the peak during the load of RssAnon (anonymous memory: tensors) and of VmRSS
(anonymous + file pages: safetensors memory-maps the files, and every page a rank reads counts
in its RSS as page cache it shares with the other ranks and the kernel can drop; sampled every
2 ms, and VmHWM after resetting it), and the load seconds (files already in the page cache).
Target per rank: 1.25 x fp32 model bytes / N + the largest fp32 tensor + the fixed overhead.
Prints a Markdown table (the largest rank of each run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]  # run from anywhere without installing

# ~0.8B parameters: embeddings 2 x 65536 x 1536 (untied) + 24 blocks of 25.2M
CONFIG = dict(vocab_size=65536, hidden_size=1536, num_hidden_layers=24, num_attention_heads=12,
              num_key_value_heads=4, head_dim=128, intermediate_size=4096, max_position_embeddings=4096,
              tie_word_embeddings=False)
MB = 2**20


def checkpoint(directory: Path) -> Path:
    """The cached bf16 checkpoint (built on first use)."""
    path = directory / "qwen3-0.8b-bf16"
    if not (path / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, Qwen3Config

        model = AutoModelForCausalLM.from_config(Qwen3Config(**CONFIG), dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="500MB")
    return path


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class PeakSampler:
    """Peak RssAnon and VmRSS of this process, sampled every 2 ms on a thread, plus the kernel's
    VmHWM (reset at start through /proc/self/clear_refs)."""

    def __enter__(self):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.anon = self.rss = 0
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.anon = max(self.anon, status_kb("RssAnon"))
            self.rss = max(self.rss, status_kb("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self._sample_once()

    def _sample_once(self):
        self.anon = max(self.anon, status_kb("RssAnon"))
        self.rss = max(self.rss, status_kb("VmRSS"), status_kb("VmHWM"))


def measure(load) -> dict:
    """Fixed overhead before `load()`, peaks and seconds during it (MB)."""
    import gc

    gc.collect()
    before = {"anon": status_kb("RssAnon") / 1024, "rss": status_kb("VmRSS") / 1024}
    with PeakSampler() as peak:
        start = time.perf_counter()
        model = load()
        seconds = time.perf_counter() - start
    return {"fixed_anon": before["anon"], "fixed_rss": before["rss"], "peak_anon": peak.anon / 1024,
            "peak_rss": peak.rss / 1024, "seconds": seconds, "model": model}


def worker(kind: str, path: str, result: str) -> None:
    import torch

    if kind == "sharded":
        import torch.distributed as dist

        from train.config import ParallelConfig
        from train.models import build_model, hf_args
        from train.parallel import build_mesh, load_hf_sharded, parallelize
        from train.parallel.sharded_load import local_bytes

        dist.init_process_group("gloo")
        world = dist.get_world_size()
        model = build_model(hf_args(path), device="meta", dtype=torch.float32)
        model = parallelize(model, ParallelConfig(data_parallel="fsdp"), build_mesh(world, 1), "cpu")
        dist.barrier()
        out = measure(lambda: load_hf_sharded(model, path, torch.float32))
        out["local_bytes"] = local_bytes(out.pop("model"))
        every, rank = [None] * world, dist.get_rank()
        dist.all_gather_object(every, out)
        dist.destroy_process_group()
        if rank != 0:
            return
    else:
        if kind == "load_hf":
            from train.models import load_hf

            def load():
                return load_hf(path, torch.float32)
        else:
            from transformers import AutoModelForCausalLM

            def load():
                return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        out = measure(load)
        model = out.pop("model")
        out["local_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        every = [out]
    Path(result).write_text(json.dumps(every))


def run(kind: str, path: Path, processes: int = 1) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        result = Path(directory) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
                    if kind == "sharded" else [sys.executable])
        subprocess.run([*launcher, __file__, "--worker", kind, "--path", str(path), "--result", str(result)],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
        return json.loads(result.read_text())


def model_facts(path: Path) -> tuple[int, int, int]:
    """(fp32 model bytes, largest fp32 tensor bytes, checkpoint bytes on disk)."""
    from safetensors import safe_open

    sizes = []
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                sizes.append(4 * math.prod(shape))
    return sum(sizes), max(sizes), sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/load_memory_bench", help="where the checkpoint is cached")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.path, args.result)
    path = checkpoint(Path(args.dir))
    model_bytes, largest, disk = model_facts(path)
    print(f"checkpoint {disk / 1e9:.2f} GB bf16 ({len(list(path.glob('*.safetensors')))} files), "
          f"{model_bytes / 1e9:.2f} GB as fp32, largest fp32 tensor {largest / MB:.0f} MiB; MiB per process, "
          "the largest rank\n")
    print("| load | processes | fp32 params MiB / rank | fixed RssAnon | peak RssAnon | target: fixed + 1.25 x "
          "model / N + largest | fixed VmRSS | peak VmRSS | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("sharded", int(n)) for n in args.processes.split(",")] + [("load_hf", 1), ("transformers", 1)]
    for kind, processes in runs:
        ranks = run(kind, path, processes)
        worst = max(ranks, key=lambda r: r["peak_anon"] - r["fixed_anon"])
        target = worst["fixed_anon"] + 1.25 * model_bytes / processes / MB + largest / MB
        name = {"sharded": "load_hf_sharded (FSDP2)", "load_hf": "load_hf (whole)",
                "transformers": "transformers from_pretrained"}[kind]
        print(f"| {name} | {processes} | {worst['local_bytes'] / MB:.0f} | {worst['fixed_anon']:.0f} | "
              f"{worst['peak_anon']:.0f} | {target:.0f} | {worst['fixed_rss']:.0f} | {worst['peak_rss']:.0f} | "
              f"{max(r['seconds'] for r in ranks):.1f} |", flush=True)


if __name__ == "__main__":
    main()
