"""Inside each worker process: ranks, the process group, the plan, the run directory.

`start_job(job, cfg)` is the first thing every entrypoint calls. It reads the launcher's plan
(TRAIN_PLAN_FILE) and checks it against torchrun's ranks and the config this worker composed,
points per-job caches at private directories, joins the process group, and takes the plan from
rank 0: rank 0 alone re-reads the checkpoint directory (the resume decision is current when
training starts) or, without a plan file (an entrypoint started by hand), plans. Rank 0 then
writes the resolved config and the env log into the run directory.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from train.launch import cluster as cluster_lib
from train.launch.conf import EXIT_USAGE, ConfError
from train.launch.memory import resource_summary
from train.launch.plan import JobPlan, PlanError, build_plan, config_fingerprint
from train.launch.rundir import ResumeError, env_log_text, resume_state
from train.launch.runlock import RunLocked, hold_in_worker
from train.launch.torchrun import write_error_record
from train.launch.watchdog import backstop_seconds, dump_stacks_on_signal, flight_recorder_env

if TYPE_CHECKING:  # annotations only: importing train.config loads Hydra
    from train.config import JobConfig

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


class WarningsOnce:
    """Python warnings (modelopt, transformers, torch) at most once per job: rank 0 shows each
    warning site (file and line) once, through the log, so it reaches the train log too; the other
    ranks show none (they run the same code and would repeat rank 0's). Installed by start_job."""

    def __init__(self):
        self.seen: set[tuple[str, int]] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if (filename, lineno) in self.seen:
            return
        self.seen.add((filename, lineno))
        log.warning("%s: %s (%s:%d; shown once per job)", category.__name__, message, filename, lineno)


def show_warnings_once(is_main: bool) -> None:
    import warnings

    if is_main:
        warnings.showwarning = WarningsOnce()
    else:
        warnings.simplefilter("ignore")


def fail(message: str) -> None:
    """Stop this worker on bad input: one `error:` line, exit code 2. Under launchers/node.sh
    (train/launch/torchrun.py) the line goes to torchrun's error file and is printed once, last."""
    if not write_error_record(f"error: {message}", EXIT_USAGE):
        print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def init_process_group(device: str, local_rank: int, world_size: int, backend: str, timeout_s: int) -> None:
    """The process group's timeout is timeout_s plus a backstop: within the training loop the hang
    watchdog (train/launch/watchdog.py) ends a hung job first, naming the rank that stopped."""
    import torch
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s + backstop_seconds(timeout_s))
        dist.init_process_group(backend, timeout=timeout)


def read_plan_file(path: str, job: str, cfg: JobConfig, world_size: int) -> JobPlan:
    """The launcher's plan, refused (exit 2, before the rendezvous) when it is not this job's."""
    try:
        plan = JobPlan.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, KeyError) as error:
        fail(f"TRAIN_PLAN_FILE={path}: not a readable plan ({error})")
    if plan.job != job:
        fail(f"TRAIN_PLAN_FILE={path}: a plan for a {plan.job} job, this is {job}")
    if plan.cluster.world_size != world_size:
        fail(f"TRAIN_PLAN_FILE={path}: torchrun started {world_size} processes, the plan has "
             f"{plan.cluster.nnodes} node(s) x {plan.cluster.procs_per_node} = {plan.cluster.world_size}")
    fingerprint = config_fingerprint(cfg)
    if plan.config_fingerprint != fingerprint:
        fail(f"TRAIN_PLAN_FILE={path}: planned for config {plan.config_fingerprint}, this worker composed "
             f"{fingerprint} (its key=value overrides differ from the launcher's TRAIN_OVERRIDES)")
    return plan


def current_resume(plan: JobPlan, cfg: JobConfig) -> JobPlan:
    """Rank 0: the resume decision as of now (a requeued or chained job may have saved since the plan)."""
    resume = resume_state(plan.paths.checkpoints, cfg.model.hf_checkpoint)
    if resume != plan.resume:
        log.warning("resume decision changed since the plan: %s at iteration %d, now %s at iteration %d",
                    plan.resume.decision, plan.resume.iteration, resume.decision, resume.iteration)
    return replace(plan, resume=resume)


def plan_from_rank0(make_plan) -> JobPlan:
    """make_plan() on rank 0, broadcast to every rank (as the plan file's JSON); an error there
    stops every rank with its message instead of leaving the others waiting."""
    import torch.distributed as dist

    answer = [None, None]  # [plan JSON, error message]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            answer = [make_plan().to_json(), None]
        except (ConfError, PlanError, ResumeError) as error:
            answer = [None, str(error)]
    if dist.is_initialized():
        dist.broadcast_object_list(answer, src=0)
    if answer[1] is not None:
        fail(answer[1])
    return JobPlan.from_json(answer[0])


def start_job(job: str, cfg: JobConfig) -> JobContext:
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
    show_warnings_once(rank == 0)
    plan_file = env.get("TRAIN_PLAN_FILE")
    planned = read_plan_file(plan_file, job, cfg, world_size) if plan_file else None
    cluster = cluster_lib.ClusterEnv(
        "torchrun" if "RANK" in env else "single", world_size // procs_per_node,
        int(env.get("GROUP_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
        int(env.get("MASTER_PORT", 0)), procs_per_node, env.get("SLURM_JOB_ID"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):  # read when the NCCL process group is made
        os.environ.update(flight_recorder_env(os.environ, planned.paths.train_log.parent if planned else None))
    init_process_group(device, local_rank, world_size, cfg.parallel.backend, cfg.parallel.timeout_s)
    lock_warnings = []

    def plan_and_lock() -> JobPlan:  # rank 0: the plan, then the run dir's lock before anything is written
        plan = current_resume(planned, cfg) if planned is not None else \
            build_plan(job, cfg, env, env.get("TRAIN_CONF_PATH", "<command line>"), cluster)
        try:  # one job per run directory (train/launch/runlock.py); a no-op under a launcher that holds it
            lock_warnings.extend(hold_in_worker(plan.paths.run_dir, env))
        except RunLocked as error:
            raise PlanError(str(error)) from None
        return plan

    plan = plan_from_rank0(plan_and_lock)
    ctx = JobContext(plan, rank, local_rank, world_size, device, timeline)
    ctx.mark("rendezvous_done")
    plan.paths.create()
    dump_stacks_on_signal(plan.paths.train_log.parent, plan.paths.datetime, rank)  # kill -USR1 <worker pid>
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
    log.info("plan %s", f"read from the launcher's {plan_file}" if plan_file else "made on rank 0 (no TRAIN_PLAN_FILE)")
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
