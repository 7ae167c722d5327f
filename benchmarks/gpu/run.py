"""GPU acceptance: every part in a process of its own with a time budget; one JSON and one Markdown report.

    bash benchmarks/gpu/run.sh [--out DIR]            on the GPU machine (installs the carried wheels)
    python benchmarks/gpu/run.py --cpu-smoke --out DIR    here: the same parts, tiny sizes, CPU

The parts (benchmarks/gpu/parts.py) run in this order, the most telling first, each with a cap
in seconds; one that fails, hangs or runs out of memory is recorded and the next one starts.
A part starts only while the whole run's budget (--budget-s, 8 minutes) has at least
MIN_START_S left, and gets at most what is left. Writes DIR/results.json, DIR/results.md
(printed too) and DIR/parts.log (every part's output). Exit 0 when no part failed or timed out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIN_START_S = 20
SMOKE_CAP_FACTOR = 3  # a 2-core CPU compiles and steps slower than the GPU machine does
# (part, cap in seconds on one H200, also in --cpu-smoke): CUDA context and imports cost ~10 s of each
PARTS = [
    ("environment", 30, True),
    ("train_step:eager", 75, True),
    ("gpu_tests", 100, True),
    ("train_step:checkpointing", 60, True),
    ("train_step:fsdp_autocast", 60, True),
    ("train_step:fsdp_mixed_precision", 60, True),
    ("loss_memory", 45, True),
    ("qad_step", 150, True),
    ("async_save", 60, True),
    ("train_step:compile", 120, False),  # compile_checkpointing below compiles in the smoke run
    ("max_micro_batch", 120, True),
    ("train_step:compile_checkpointing", 120, True),
]


def run_part(part: str, size: str, out: Path, timeout_s: float, log) -> dict:
    result_file = out / f"{part.replace(':', '-')}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, str(HERE / "parts.py"), part, "--size", size, "--json", str(result_file)]
    started = time.perf_counter()
    log.write(f"\n===== {part} (cap {timeout_s:.0f} s)\n")
    log.flush()
    try:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.perf_counter() - started
    if code is None:
        return {"part": part, "status": "timeout", "seconds": seconds, "error": f"over its cap of {timeout_s:.0f} s"}
    if code or not result_file.exists():
        return {"part": part, "status": "failed", "seconds": seconds, "error": last_error(out / "parts.log")}
    result = json.loads(result_file.read_text())
    result_file.unlink()  # its content goes into results.json
    return {"part": part, "seconds": seconds, **result}


def last_error(log_path: Path) -> str:
    """The last line of the part's output that names an error (the exception's line)."""
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["no output"])[-1].strip()[:300]


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(cell(v) for v in value)
    return str(value).replace("|", "/")


def markdown(results: list[dict], size: str, total_s: float) -> str:
    lines = [f"# GPU acceptance ({size}), {total_s:.0f} s", "",
             "| part | status | seconds | notes |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']:.0f} | "
                     f"{cell(r.get('error') or '; '.join(r.get('notes', [])))} |")
    for r in results:
        rows = r.get("rows") or []
        if r["part"] == "gpu_tests":  # the failures only: the notes count the rest
            rows = [row for row in rows if row["outcome"] == "failed"]
        if not rows:
            continue
        keys = list(dict.fromkeys(key for row in rows for key in row))
        lines += ["", f"## {r['part']}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(cell(row.get(key)) for key in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-acceptance"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the script works")
    parser.add_argument("--budget-s", type=float, help="the whole run's wall-time budget (default 480; 1800 "
                        "with --cpu-smoke)")
    parser.add_argument("--only", help="comma-separated parts (default: all, in order)")
    args = parser.parse_args()
    size = "smoke" if args.cpu_smoke else "full"
    parts = [(name, cap * SMOKE_CAP_FACTOR if args.cpu_smoke else cap) for name, cap, in_smoke in PARTS
             if in_smoke or not args.cpu_smoke]
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {name for name, _ in parts})
        if unknown:
            print(f"error: --only: unknown part(s) {', '.join(unknown)}; parts: {', '.join(n for n, _ in parts)}",
                  file=sys.stderr)
            return 2
        parts = [(name, cap) for name, cap in parts if name in wanted]
    budget_s = args.budget_s or (1800 if args.cpu_smoke else 480)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    with open(args.out / "parts.log", "w") as log:
        for part, cap in parts:
            left = budget_s - (time.perf_counter() - started)
            if left < MIN_START_S:
                results.append({"part": part, "status": "not run", "seconds": 0.0,
                                "error": f"{left:.0f} s of the budget left"})
                continue
            result = run_part(part, size, args.out, min(cap, left), log)
            results.append(result)
            print(f"[gpu-acceptance] {part}: {result['status']} in {result['seconds']:.0f} s", flush=True)
    total_s = time.perf_counter() - started
    (args.out / "results.json").write_text(json.dumps({"size": size, "seconds": total_s, "parts": results},
                                                      indent=1, default=str))
    report = markdown(results, size, total_s)
    (args.out / "results.md").write_text(report)
    print(report)
    return int(any(r["status"] in ("failed", "timeout") for r in results))


if __name__ == "__main__":
    sys.exit(main())
