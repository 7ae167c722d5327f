"""Reliability trials: kill -9 and damaged checkpoints on a real run, and nothing lost.

    PYTHONPATH=. python benchmarks/reliability/run.py [--trials 8] [--iters 400] [--seed 0] [--out DIR]

One reference run of tiny-qwen3 (`launchers/pretrain.sh`, 2 processes over gloo, a checkpoint
every 10 iterations) goes to --iters uninterrupted. Then the same run again in another root, but
started over and over: each start is killed with SIGKILL at a random moment (during start-up
or training), its target rotating through the launcher's process group, torchrun, node.sh and
one worker; every third kill, the newest checkpoint is damaged (one shard truncated) before the
next start; once, a second job is started on the run directory while the first holds it. After each
kill: which of the job's processes are still alive 10 s later. When the trials are spent, the
last start runs to the end. Then: the losses of every iteration against the reference, bitwise.

Prints a Markdown table and writes it with the raw trial records to DIR/reliability.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]  # run from anywhere without installing

from test_job_safety import launcher_env, marked_processes, workers  # noqa: E402

from train.runlogs import merged_records  # noqa: E402

TARGETS = ("group", "torchrun", "node.sh", "worker")
START = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {message}", flush=True)


def overrides(iters: int) -> list[str]:
    return [f"training.train_iters={iters}", "checkpoint.save_interval=10"]


def run_dir(root: Path) -> Path | None:
    found = [p.parent for p in root.glob("*/logs")]
    return found[0] if found else None


def losses(root: Path) -> dict[int, float]:
    records, _ = merged_records(run_dir(root))
    return {record["iteration"]: record["loss"] for record in records}


def start_launcher(root: Path, marker: str, iters: int) -> subprocess.Popen:
    """`setsid bash launchers/pretrain.sh ...` (a process group of its own), output into root/starts.log."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "starts.log", "a") as output:
        return subprocess.Popen(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--",
                                 *overrides(iters)], cwd=REPO, env=launcher_env(root, marker), stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill(launcher: subprocess.Popen, marker: str, target: str) -> int | None:
    """SIGKILL to the launcher's group, torchrun, node.sh or one worker (the newest pid); the pid killed."""
    if target == "group":
        os.killpg(launcher.pid, signal.SIGKILL)
        return launcher.pid
    processes = marked_processes(marker)
    if target == "worker":  # during start-up: once torchrun has started them
        deadline = time.time() + 60
        while not workers(marker) and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        pids = sorted(workers(marker))
    elif target == "torchrun":  # its command line holds the worker's `-m train.<job>` too
        pids = [pid for pid, cmd in processes.items() if "bin/torchrun" in cmd]
    else:
        pids = [pid for pid, cmd in processes.items() if cmd.startswith("bash") and "launchers/node.sh" in cmd]
    if not pids:
        return None
    os.kill(pids[-1], signal.SIGKILL)
    return pids[-1]


def survivors_after(launcher: subprocess.Popen, marker: str, seconds: float = 10.0) -> int:
    """The job's processes alive `seconds` after the kill (then killed, so that trials stay apart)."""
    try:
        launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    time.sleep(seconds)
    left = marked_processes(marker)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    return len(left)


def damage_newest_checkpoint(root: Path) -> str | None:
    """Truncates one shard of the newest published checkpoint to half its size; returns its path."""
    directories = sorted(p for p in (run_dir(root) / "checkpoints").glob("*/iter_*") if p.name[5:].isdigit())
    shards = sorted(directories[-1].glob("*.distcp")) if directories else []
    if not shards:
        return None
    shard = shards[-1]
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    return str(shard.relative_to(root))


def second_job_refused(root: Path, iters: int) -> bool:
    """A second launcher on the held run directory: exit 2 and one error line naming run.lock."""
    second = subprocess.run(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--",
                             *overrides(iters)], cwd=REPO, env=launcher_env(root, uuid.uuid4().hex),
                            capture_output=True, text=True, timeout=180)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    return second.returncode == 2 and len(errors) == 1 and "run.lock" in errors[0]


def logged_iteration(root: Path) -> int:
    """The last iteration a start printed ("iter N |" in root/starts.log), 0 before any."""
    found = re.findall(rb"\] iter (\d+) \|", (root / "starts.log").read_bytes()[-20000:]) \
        if (root / "starts.log").exists() else []
    return int(found[-1]) if found else 0


def first_steps(root: Path) -> int:
    """Job starts that reached their first step (each writes logs/startup_<datetime>.json then)."""
    return len(list(root.glob("*/logs/startup_*.json")))


def run_to_end(root: Path, iters: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--",
                           *overrides(iters)], cwd=REPO, env=launcher_env(root, uuid.uuid4().hex),
                          capture_output=True, text=True, timeout=1800)


def trials(root: Path, args, rng: random.Random) -> list[dict]:
    """Every fourth start is killed during its start-up (1-8 s after the launch), the others in
    training, 5 to 60 iterations after where the previous start got to."""
    records = []
    for number in range(args.trials):
        marker, target = uuid.uuid4().hex, TARGETS[number % len(TARGETS)]
        started_before = first_steps(root)
        launcher = start_launcher(root, marker, args.iters)
        refused = None
        if number == 1:  # once this start trains, so holds the run directory
            while first_steps(root) == started_before and launcher.poll() is None:
                time.sleep(0.2)
            refused = second_job_refused(root, args.iters)
        if number % 4 == 3:
            time.sleep(rng.uniform(1, 8))
        else:
            kill_at = min(args.iters - 10, logged_iteration(root) + rng.randint(5, 60))
            deadline = time.time() + 600
            while logged_iteration(root) < kill_at and launcher.poll() is None and time.time() < deadline:
                time.sleep(0.05)
        if launcher.poll() is not None:
            log(f"trial {number}: the job ended (exit {launcher.returncode}) before its kill; trials stop here")
            break
        record = {"trial": number, "target": target, "in_training": first_steps(root) > started_before,
                  "killed_after_iteration": logged_iteration(root)}
        if refused is not None:
            record["second_job_refused"] = refused
        record["killed_pid"] = kill(launcher, marker, target)
        record["survivors"] = survivors_after(launcher, marker)
        record["launcher_exit"] = launcher.returncode  # 0: the job ended before the kill took
        if number % 3 == 2:
            record["damaged"] = damage_newest_checkpoint(root)
        log(f"trial {number}: {record}")
        if record["killed_pid"] is None or record["launcher_exit"] == 0:
            log(f"trial {number}: the job ended before its kill; trials stop here")
            break
        records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-reliability")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    reference_root, trial_root = args.out / f"reference-{args.iters}", args.out / f"trials-{uuid.uuid4().hex[:8]}"
    if run_dir(reference_root) is None or len(losses(reference_root)) < args.iters:
        log(f"reference: {args.iters} iterations uninterrupted")
        done = run_to_end(reference_root, args.iters)
        if done.returncode != 0:
            sys.exit(f"error: the reference run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    records = trials(trial_root, args, rng)
    log("the last start, to the end")
    final = run_to_end(trial_root, args.iters)
    warnings = [line for line in final.stderr.splitlines() if "warning:" in line]
    expected, got = losses(reference_root), losses(trial_root)
    differing = sorted(i for i in expected if got.get(i) != expected[i])
    summary = {
        "trials": len(records), "kills_by_target": {t: sum(r["target"] == t for r in records) for t in TARGETS},
        "kills_in_training": sum(r["in_training"] for r in records),
        "processes_left_10s_after_a_kill": sum(r["survivors"] for r in records),
        "damaged_checkpoints": sum(bool(r.get("damaged")) for r in records),
        "second_job_refused": [r["second_job_refused"] for r in records if "second_job_refused" in r],
        "final_exit": final.returncode, "iterations": len(expected),
        "iterations_with_a_different_loss": len(differing), "final_warnings": warnings[-5:]}
    table = "\n".join([
        "| trial | outcome |", "|---|---|",
        f"| kill -9 of a running job ({summary['trials']}: {', '.join(f'{n} {t}' for t, n in summary['kills_by_target'].items())}; "
        f"{summary['kills_in_training']} during training, the others during start-up) | {summary['processes_left_10s_after_a_kill']} "
        "processes left 10 s after the kills |",
        f"| newest checkpoint damaged (a shard truncated) before the next start | {summary['damaged_checkpoints']} times |",
        f"| a second job on the held run directory | refused: {summary['second_job_refused']} |",
        f"| the last start, to the end | exit {final.returncode} |",
        f"| losses of all {len(expected)} iterations vs the uninterrupted run | "
        f"{len(expected) - len(differing)} bitwise equal, {len(differing)} different |"])
    print("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.md").write_text(table + "\n")
    (args.out / "reliability.json").write_text(json.dumps({"summary": summary, "trials": records}, indent=2))
    if final.returncode != 0 or differing or summary["processes_left_10s_after_a_kill"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
