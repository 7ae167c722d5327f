"""python benchmarks/launch_latency/run.py [--repeats 3]  (as root; starts tests/slurm/local-cluster.sh)

Seconds from `sbatch --nodes=2 slurm/pretrain.sh --config tiny-qwen3` to the first training
step on the local two-node cluster, split into: queue wait (submit -> batch script starts),
launcher (plan + srun + torchrun spawning the workers), imports (python start -> job start,
torch included), rendezvous (process group ready), model build, first step.
The workers write the timeline to <run dir>/logs/startup_<datetime>.json (train/launch/job.py).
"""

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = [("queue wait", "submitted", "launcher_start"), ("launcher", "launcher_start", "process_start"),
          ("imports", "process_start", "imports_done"), ("rendezvous", "imports_done", "rendezvous_done"),
          ("model build", "rendezvous_done", "model_built"), ("first step", "model_built", "first_step")]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "UNKNOWN"


def one_launch(work: Path) -> dict:
    root = work / f"runs-{time.time_ns()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["QAD_CHECKPOINT_ROOT"] = str(root)
    submitted = time.time()
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", str(REPO / "slurm/pretrain.sh"), "--config",
                          "tiny-qwen3", "--", "training.train_iters=1"], cwd=work, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    while job_state(job) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        time.sleep(0.1)
    if job_state(job) != "COMPLETED":
        raise SystemExit(f"job {job} ended {job_state(job)}; see {work}")
    timeline = json.loads(next(root.glob("*/logs/startup_*.json")).read_text())
    return {"submitted": submitted, **timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    subprocess.run(["bash", str(REPO / "tests/slurm/local-cluster.sh"), "start"], check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="launch-latency-"))
    os.chmod(work, 0o755)
    runs = [one_launch(work) for _ in range(args.repeats)]
    print(f"sbatch --nodes=2 slurm/pretrain.sh --config tiny-qwen3 (2 nodes x 2 CPU procs), "
          f"median of {args.repeats}\n")
    print("| phase | seconds | share |\n|---|---|---|")
    total = statistics.median(r["first_step"] - r["submitted"] for r in runs)
    for name, start, end in PHASES:
        seconds = statistics.median(r[end] - r[start] for r in runs)
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    print(f"| **sbatch to first step** | **{total:.2f}** | 100% |")


if __name__ == "__main__":
    main()
