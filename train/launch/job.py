"""Inside each worker process: ranks, the process group, the plan, the run directory.

`start_job(job, cfg)` is the first thing every entrypoint calls. It cross-checks the
ranks torchrun gave against what the launcher planned, points per-job caches at
private directories, joins the process group, and (rank 0) writes the resolved config
and the env log into the run directory.
"""

import datetime
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from train.launch import cluster as cluster_lib
from train.launch.conf import EXIT_USAGE, ConfError
from train.launch.memory import resource_summary
from train.launch.plan import JobPlan, PlanError, build_plan
from train.launch.rundir import ResumeError, env_log_text
from train.launch.runlock import RunLocked, hold_in_worker

log = logging.getLogger("train")


@dataclass
class JobContext:
    plan: JobPlan
    rank: int
    local_rank: int
    world_size: int
    device: str  # cpu | cuda:<local rank>
    timeline: dict = None  # wall-clock seconds of startup events (benchmarks/launch_latency)

    def mark(self, event: str) -> None:
        """Record a startup event; at first_step the timeline goes to logs/startup_<datetime>.json."""
        self.timeline[event] = time.time()
        if event == "first_step" and self.is_main:
            path = self.plan.paths.run_dir / "logs" / f"startup_{self.plan.paths.datetime}.json"
            path.write_text(json.dumps(self.timeline, indent=1))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_ranks(env: dict[str, str]) -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, procs_per_node) from torchrun; one process without it."""
    world = int(env.get("WORLD_SIZE", 1))
    return (int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), world,
            int(env.get("LOCAL_WORLD_SIZE", world)))


def set_job_caches(env: dict[str, str], rank: int) -> None:
    """Compiler caches per job and rank: two jobs (or ranks) on one node never share one."""
    job = env.get("SLURM_JOB_ID") or f"local{os.getppid()}"
    base = Path(env.get("TMPDIR") or tempfile.gettempdir())
    for variable, name in (("TRITON_CACHE_DIR", "triton"), ("TORCHINDUCTOR_CACHE_DIR", "inductor")):
        os.environ.setdefault(variable, str(base / f"{name}-{job}-rank{rank}"))


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def init_process_group(ctx: JobContext, backend: str, timeout_s: int) -> None:
    import torch
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if ctx.device.startswith("cuda"):
        torch.cuda.set_device(ctx.local_rank)
    if ctx.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def start_job(job: str, cfg) -> JobContext:
    import torch
    from omegaconf import OmegaConf

    import train

    env = dict(os.environ)
    timeline = {"launcher_start": float(env.get("LAUNCH_T0") or train.PROCESS_START_S),
                "process_start": train.PROCESS_START_S, "imports_done": time.time()}
    rank, local_rank, world_size, procs_per_node = torchrun_ranks(env)
    set_job_caches(env, rank)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    planned = env.get("NNODES"), env.get("NUM_GPUS")
    if all(planned) and int(planned[0]) * int(planned[1]) != world_size:
        fail(f"torchrun started {world_size} processes, the launcher planned NNODES x NUM_GPUS = "
             f"{planned[0]} x {planned[1]}")
    cluster = cluster_lib.ClusterEnv(
        "torchrun" if "RANK" in env else "single", world_size // procs_per_node,
        int(env.get("GROUP_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
        int(env.get("MASTER_PORT", 0)), procs_per_node, env.get("SLURM_JOB_ID"))
    try:
        plan = build_plan(job, cfg, env, env.get("TRAIN_CONF_PATH", "<command line>"), cluster)
    except (ConfError, PlanError, ResumeError) as error:
        fail(str(error))
    lock_warnings = []
    if rank == 0:  # one job per run directory (train/launch/runlock.py), before anything is written
        try:
            lock_warnings = hold_in_worker(plan.paths.run_dir, env)
        except RunLocked as error:
            fail(str(error))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    ctx = JobContext(plan, rank, local_rank, world_size, device, timeline)
    init_process_group(ctx, cfg.parallel.backend, cfg.parallel.timeout_s)
    ctx.mark("rendezvous_done")
    plan.paths.create()
    if ctx.is_main:
        train_log = logging.FileHandler(plan.paths.train_log)
        train_log.setFormatter(logging.getLogger().handlers[0].formatter)
        logging.getLogger().addHandler(train_log)
        plan.paths.resolved_config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        plan.paths.env_log.write_text(env_log_text(job, env.get("TRAIN_CONF_PATH", "-"), env,
                                                   env.get("SLURM_JOB_ID", "-"), plan.paths.datetime))
    log.info("%s job: world size %d (%d nodes x %d procs), rank %d on %s, DP %d, GBS %d",
             job, world_size, cluster.nnodes, procs_per_node, rank, socket.gethostname(),
             plan.data_parallel_size, plan.global_batch_size)
    log.info("run dir %s; resume: %s at iteration %d (%s)", plan.paths.run_dir, plan.resume.decision,
             plan.resume.iteration, plan.resume.path or "-")
    for warning in lock_warnings:
        log.warning("%s", warning)
    for damaged in plan.resume.skipped:
        log.warning("skipped damaged checkpoint %s", damaged)
    log.info("plan: %s", resource_summary(plan.resources))
    if plan.blend_path:
        log.info("datablend %s, train samples %s", plan.blend_path, plan.train_samples)
    return ctx
