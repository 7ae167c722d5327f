"""Checkpoint verification cost, the manifest's head/tail crc32 vs a full crc32: `python benchmarks/checkpoint_manifest/run.py`.

Writes --gb GB of random bytes as 4 shard files into a temporary directory (--dir, default: next to
this checkout), then times, side by side, train/launch/rundir.py's checkpoint_manifest (size plus
crc32 of the first and last MiB of each file: what the plan does before every resume) and a full
crc32 of every file read in 16 MiB chunks. The page cache is dropped before each timed pass when
this process may (root: /proc/sys/vm/drop_caches), so both read from the disk; otherwise both read
cached files (the full pass then measures crc32's CPU cost only). Prints a Markdown table.
"""

import argparse
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from train.launch.rundir import checkpoint_manifest  # noqa: E402


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def full_crc32(directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        crc = 0
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                crc = zlib.crc32(chunk, crc)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[3]))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        for shard in range(4):
            with open(directory / f"__{shard}_0.distcp", "wb") as f:
                for _ in range(int(args.gb * 1024 / 4 / 16)):
                    f.write(os.urandom(16 << 20))
        rows = []
        for name, function in (("manifest (size + head/tail crc32)", checkpoint_manifest), ("full crc32", full_crc32)):
            cold = drop_caches()
            start = time.perf_counter()
            function(directory)
            rows.append((name, time.perf_counter() - start, cold))
    print(f"| {args.gb:g} GB in 4 files | seconds | page cache dropped |\n|---|---|---|")
    for name, seconds, cold in rows:
        print(f"| {name} | {seconds:.3f} | {'yes' if cold else 'no'} |")
    print(f"\nfull / manifest: {rows[1][1] / rows[0][1]:.0f}x")


if __name__ == "__main__":
    main()
