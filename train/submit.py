"""python -m train.submit --config C [--job J] [--chain N] [--dependency afterany|afterok]
                         [--hf-token-file F] [sbatch options ...] [-- key=value ...]

Validates the conf here, before anything is queued, then submits slurm/<job>.sh N times
(<job>: the conf's JOB; --job must agree), each job depending on the previous one, and
prints the job ids. Every job resumes from
the latest checkpoint of the run (docs/runs.md, resume rule), so a chain continues one run.
Chained jobs do not requeue themselves (REQUEUE=0): the next job in the chain resumes.
"""

import argparse
import os
import shutil
import subprocess
import sys

from train.launch.cluster import ClusterError
from train.launch.conf import EXIT_USAGE, REPO_ROOT, ConfError, job_of_conf, resolve_conf_path
from train.launch.plan import PlanError, plan_from_conf


def nodes_option(sbatch_options: list[str]) -> int | None:
    for index, option in enumerate(sbatch_options):
        for flag in ("--nodes", "-N"):
            if option == flag and index + 1 < len(sbatch_options):
                return int(sbatch_options[index + 1].split("-")[0])
            if option.startswith(flag + "="):
                return int(option.split("=", 1)[1].split("-")[0])
    return None


def sbatch_command(job: str, args, sbatch_options: list[str], dependency: str | None) -> list[str]:
    command = ["sbatch", "--parsable", "--export=ALL,REQUEUE=0" if args.chain > 1 else "--export=ALL"]
    if dependency:
        command.append(f"--dependency={dependency}")
    command += [*sbatch_options, str(REPO_ROOT / "slurm" / f"{job}.sh"), "--config", str(args.config_path)]
    if args.hf_token_file:
        command += ["--hf-token-file", args.hf_token_file]
    return command + ["--", *args.overrides]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.submit", description=__doc__.split("\n\n")[1])
    parser.add_argument("--config", required=True)
    parser.add_argument("--job", choices=["qad", "pretrain", "finetune"], help="default: the conf's JOB")
    parser.add_argument("--chain", type=int, default=1, help="jobs to submit, each after the previous")
    parser.add_argument("--dependency", choices=["afterany", "afterok"], default="afterany")
    parser.add_argument("--hf-token-file")
    argv = sys.argv[1:] if argv is None else argv
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    args, sbatch_options = parser.parse_known_args(own)
    args.overrides = overrides
    if args.chain < 1:
        print(f"error: --chain {args.chain}: give at least 1", file=sys.stderr)
        return EXIT_USAGE
    if not shutil.which("sbatch"):
        print("error: sbatch not found: run this on a SLURM login node "
              "(or bash launchers/<job>.sh on a workstation)", file=sys.stderr)
        return EXIT_USAGE
    try:
        args.config_path = resolve_conf_path(args.config)
        env = dict(os.environ)
        job = args.job or job_of_conf(args.config, env)
        if args.hf_token_file:
            env["HF_TOKEN"] = open(args.hf_token_file).read().strip()
        plan_from_conf(job, args.config, overrides, env, nodes_option(sbatch_options) or 1)
    except (ConfError, PlanError, ClusterError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    previous = None
    for _ in range(args.chain):
        dependency = f"{args.dependency}:{previous}" if previous else None
        result = subprocess.run(sbatch_command(job, args, sbatch_options, dependency),
                                capture_output=True, text=True)
        if result.returncode != 0:
            print(f"error: sbatch failed: {result.stderr.strip()}", file=sys.stderr)
            return result.returncode
        previous = result.stdout.strip().split(";")[0]
        print(previous, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
