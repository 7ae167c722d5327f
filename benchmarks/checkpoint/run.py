"""Checkpoint save/load GB/s, CheckpointManager (DCP) vs torch.save/torch.load: `python benchmarks/checkpoint/run.py`.

State: an ~80M-parameter fp32 model (a stack of Linear layers) after one AdamW step, i.e.
weights + exp_avg + exp_avg_sq = ~0.96 GB, in one process. Both candidates write into a
temporary directory on the same disk (--dir, default: next to this checkout) and read it
back; the rounds alternate between them, with an untimed os.sync() before each timed
operation (no candidate pays for the write-back of the previous one's dirty pages), and
each save goes to a new file or directory: the previous one is removed, untimed, right
before it (so both candidates write into page-cache memory freed just before: on this VM,
memory left free for a few seconds goes back to the host and costs ~1 s/GB to touch again;
on ext4, rewriting a truncated file instead would start its write-back at close).
Nothing is dropped from the page cache, so the loads read cached files. Saves end
durable on both sides: the manager fsyncs every file and directory it writes (its whole
protocol is timed: temp dir, RNG and trainer.pt, DCP shards, publish, tracker; purging
old checkpoints is not: keep_last=0, old ones are removed between rounds), torch.save is
followed by an fsync of its file. Rows for torch.save without the fsync (page cache only)
and with its zip CRC32 off (our writer skips it, train/checkpoint.py) show where the
difference comes from. Load: DCP fills the existing tensors in place (what resume does);
torch.load allocates new ones. Prints a Markdown table; the ratio is torch's time over ours.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere without installing
from train.checkpoint import fsync_path  # noqa: E402

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def build_state(params_m: int, width: int = 2048):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    layers = max(1, round(params_m * 1e6 / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def nbytes(state) -> int:
    if isinstance(state, dict):
        return sum(nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(nbytes(v) for v in state)
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def torch_save(state, path: Path, fsync: bool, crc32: bool = True) -> None:
    """torch.save into a new file (path must not exist), then optionally its fsync."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(crc32)
    try:
        torch.save(state, path)
    finally:
        torch.serialization.set_crc32_options(previous)
    if fsync:
        fsync_path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params-m", type=int, default=80, help="model parameters, millions")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write-threads", type=int, default=4, help="DCP writer threads (CheckpointManager default 4)")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[2]),
                        help="parent of the temporary directory (same disk as the runs)")
    args = parser.parse_args()

    from train.checkpoint import CheckpointManager

    state = build_state(args.params_m)
    size = nbytes(state)
    work = Path(tempfile.mkdtemp(prefix=".bench_checkpoint_", dir=args.dir))
    # keep_last=0: purging old checkpoints happens outside the timing
    manager = CheckpointManager(work / "dcp", keep_last=0, write_threads=args.write_threads)
    torch_file = work / "torch" / "state.pt"
    torch_file.parent.mkdir()
    times: dict[str, list[float]] = {k: [] for k in ("dcp_save", "dcp_load", "torch_save_fsync", "torch_save",
                                                     "torch_save_fsync_nocrc", "torch_load")}

    def timed(name, fn):
        os.sync()  # untimed: no candidate pays for the write-back of the one before it
        start = time.perf_counter()
        result = fn()
        times[name].append(time.perf_counter() - start)
        return result

    def fresh_torch_file() -> Path:
        torch_file.unlink(missing_ok=True)  # untimed; the next os.sync() commits it
        return torch_file

    try:
        for iteration in range(1, args.rounds + 1):
            if iteration > 1:  # untimed, right before the save, as for the torch.save file below
                shutil.rmtree(manager.path(iteration - 1))
            timed("dcp_save", lambda: manager.save(iteration, state, {"iteration": iteration}))
            timed("dcp_load", lambda: manager.load(iteration, state))
            path = fresh_torch_file()
            timed("torch_save_fsync", lambda: torch_save(state, path, fsync=True))
            path = fresh_torch_file()
            timed("torch_save", lambda: torch_save(state, path, fsync=False))
            path = fresh_torch_file()
            timed("torch_save_fsync_nocrc", lambda: torch_save(state, path, fsync=True, crc32=False))
            loaded = timed("torch_load", lambda: torch.load(torch_file, weights_only=True))
            del loaded
    finally:
        shutil.rmtree(work, ignore_errors=True)

    for name, values in times.items():
        print(f"  {name:22s} " + " ".join(f"{v:.2f}" for v in values) + " s", flush=True)
    best = {name: min(values) for name, values in times.items()}
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    gb = size / 1e9
    print(f"\nState: {gb:.2f} GB ({args.params_m}M params fp32 + AdamW), {args.rounds} interleaved rounds, "
          f"page cache warm, DCP writer threads {args.write_threads}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}\n")
    print("| operation | CheckpointManager (DCP) median / best | torch.save / torch.load median / best | "
          "ratio median (best) |")
    print("|---|---|---|---|")
    rows = [("save", "dcp_save", "torch_save_fsync", " vs torch.save+fsync (the target)"),
            ("save", "dcp_save", "torch_save", " vs torch.save, no fsync (not durable)"),
            ("save", "dcp_save", "torch_save_fsync_nocrc", " vs torch.save+fsync, zip CRC32 off"),
            ("load", "dcp_load", "torch_load", "")]
    for op, ours, theirs, note in rows:
        print(f"| {op}{note} | {gb / median[ours]:.2f} / {gb / best[ours]:.2f} GB/s | "
              f"{gb / median[theirs]:.2f} / {gb / best[theirs]:.2f} GB/s | "
              f"{median[theirs] / median[ours]:.2f}x ({best[theirs] / best[ours]:.2f}x) |")

if __name__ == "__main__":
    main()
