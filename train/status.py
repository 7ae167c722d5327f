"""python -m train.status [ROOT] [--json]: the runs under a QAD_CHECKPOINT_ROOT, one line each.

ROOT defaults to $QAD_CHECKPOINT_ROOT, else ./runs. A run is a directory below ROOT with
logs/ or checkpoints/ (logs_slurm/ is not one). Columns:

    RUN       the run directory's name
    JOB       SLURM_JOB_ID from the run's latest env log (logs/*.env.log); "-" outside SLURM
    STATE     `squeue -h -j JOB -o %T` while SLURM knows the job (PENDING, RUNNING, ...);
              otherwise from the files of the latest job start: the launcher's stop file
              (logs/stop_<datetime>.json) or the train log's last "stopped at iteration N:
              <reason>" / "stopping: ..." line -> done | signal | time_budget | eval_only |
              non_finite; no such line: running (a metric record in the last 5 minutes)
              or dead (none since)
    ITER      last training iteration logged, "/" train_iters
    LOSS      its loss;  TOK/S  its tokens/s (all devices)
    ETA       (train_iters - ITER) x seconds per iteration, measured as the wall time
              between the last (up to 20) records of the latest job start (so checkpoint
              and evaluation pauses count); "-" once done or not running
    CKPT      the latest complete checkpoint (latest_checkpointed_iteration.txt)

train_iters: every training record in the JSONL carries it (the plan's value, also when
it came from TRAIN_SAMPLES // GBS); logs that predate that fall back to training.train_iters
of the newest logs/*.config.yaml. Errors (no such directory, no runs) print `error: ...`
and exit 2.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from train.runlogs import jsonl_files, merged_records, number, read_jsonl

EXIT_USAGE = 2
RUNNING_WINDOW_S = 300
TRACKER_FILE = "latest_checkpointed_iteration.txt"
STOPPED = re.compile(r"stopped at iteration (\d+): (\w+)")


def newest(paths) -> Path | None:
    paths = sorted(paths, key=lambda p: (p.stat().st_mtime, p.name))
    return paths[-1] if paths else None


def job_id(run_dir: Path) -> str | None:
    env_log = newest((run_dir / "logs").glob("*.env.log"))
    if env_log is None:
        return None
    for line in env_log.read_text(errors="replace").splitlines():
        if line.startswith("SLURM_JOB_ID="):
            return line.partition("=")[2].strip() or None
    return None


def squeue_state(job: str | None) -> str | None:
    if not job or not shutil.which("squeue"):
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    return lines[0] if result.returncode == 0 and lines else None


def latest_checkpoint(run_dir: Path) -> str | None:
    trackers = list((run_dir / "checkpoints").glob(f"*/{TRACKER_FILE}"))
    tracker = newest(trackers)
    if tracker is None:
        return None
    text = tracker.read_text().strip()
    return f"iter_{int(text):07d}" if text.isdigit() else None


def config_train_iters(run_dir: Path) -> int | None:
    config = newest((run_dir / "logs").glob("*.config.yaml"))
    if config is None:
        return None
    try:
        import yaml

        value = (yaml.safe_load(config.read_text()) or {}).get("training", {}).get("train_iters")
    except Exception:  # noqa: BLE001  an unreadable config leaves ETA unknown
        return None
    return int(value) if isinstance(value, int) else None


def file_state(run_dir: Path, latest_jsonl: Path | None, last_time: float | None) -> str:
    """State of the latest job start from its files (see the module docstring)."""
    stamp = None
    if latest_jsonl is not None:
        stamp = "_".join(latest_jsonl.stem.rsplit("_", 2)[-2:])
    logs = run_dir / "logs"
    stop = logs / f"stop_{stamp}.json" if stamp else newest(logs.glob("stop_*.json"))
    if stop is not None and stop.is_file():
        try:
            return str(json.loads(stop.read_text()).get("reason") or "stopped")
        except (json.JSONDecodeError, OSError):
            pass
    train_logs = [p for p in logs.glob(f"*_{stamp}.log")] if stamp else list(logs.glob("*.log"))
    train_log = newest([p for p in train_logs if not p.name.endswith(".env.log")])
    if train_log is not None:
        tail = train_log.read_text(errors="replace")[-20000:]
        if "stopping:" in tail and "non-finite" in tail:
            return "non_finite"
        matches = STOPPED.findall(tail)
        if matches:
            return matches[-1][1]
    if last_time is not None and time.time() - last_time < RUNNING_WINDOW_S:
        return "running"
    return "dead" if last_time is not None else "not started"


def seconds_per_iteration(records: list[dict]) -> float | None:
    recent = records[-20:]
    if len(recent) >= 2:
        span = recent[-1]["iteration"] - recent[0]["iteration"]
        elapsed = number(recent[-1].get("time")), number(recent[0].get("time"))
        if span > 0 and None not in elapsed and elapsed[0] > elapsed[1]:
            return (elapsed[0] - elapsed[1]) / span
    times = [number(r.get("iter_time_s")) for r in recent]
    times = [t for t in times if t is not None]
    return sum(times) / len(times) if times else None


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def run_status(run_dir: Path) -> dict:
    train, _ = merged_records(run_dir)
    files = jsonl_files(run_dir)
    latest_jsonl = files[-1] if files else None
    latest_records = [r for r in read_jsonl(latest_jsonl) if "loss" in r] if latest_jsonl else []
    last = train[-1] if train else {}
    last_time = max((number(r.get("time")) or 0.0 for r in read_jsonl(latest_jsonl)), default=None) \
        if latest_jsonl else None
    job = job_id(run_dir)
    state = squeue_state(job) or file_state(run_dir, latest_jsonl, last_time or None)
    train_iters = last.get("train_iters") if isinstance(last.get("train_iters"), int) else config_train_iters(run_dir)
    iteration = last.get("iteration")
    eta = None
    if state in ("running", "RUNNING") and train_iters and iteration is not None:
        per_iteration = seconds_per_iteration(latest_records)
        if per_iteration is not None:
            eta = max(train_iters - iteration, 0) * per_iteration
    return {"run": run_dir.name, "job_id": job, "state": state, "iteration": iteration,
            "train_iters": train_iters, "loss": number(last.get("loss")) if last else None,
            "tokens_per_s": number(last.get("tokens_per_s")) if last else None,
            "eta_s": eta, "checkpoint": latest_checkpoint(run_dir)}


def find_runs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name != "logs_slurm"
                  and ((p / "logs").is_dir() or (p / "checkpoints").is_dir()))


def format_table(rows: list[dict]) -> str:
    header = ["RUN", "JOB", "STATE", "ITER", "LOSS", "TOK/S", "ETA", "CKPT"]
    lines = [header]
    for row in rows:
        iteration = "-" if row["iteration"] is None else str(row["iteration"])
        if row["train_iters"]:
            iteration += f"/{row['train_iters']}"
        lines.append([row["run"], row["job_id"] or "-", row["state"], iteration,
                      "-" if row["loss"] is None else f"{row['loss']:.4f}",
                      "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.0f}",
                      format_eta(row["eta_s"]), row["checkpoint"] or "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.status", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=os.environ.get("QAD_CHECKPOINT_ROOT") or "runs",
                        help="QAD_CHECKPOINT_ROOT (default: $QAD_CHECKPOINT_ROOT, else ./runs)")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root}: no such directory", file=sys.stderr)
        return EXIT_USAGE
    runs = find_runs(root)
    if not runs:
        print(f"error: {root}: no runs (no <run>/logs or <run>/checkpoints below it)", file=sys.stderr)
        return EXIT_USAGE
    rows = [run_status(run) for run in runs]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
