"""python -m pytest tests/slurm/test_jobs.py  (as root: real sbatch/srun jobs on tests/slurm/local-cluster.sh)"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import job_field, job_state, sbatch, squeue_ids, wait_for_state

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-pretrain-Data-synthetic-lr0.001"
TOKENS = {"file": "hf_FAKE_token_from_file_0123", "env": "hf_FAKE_token_from_env_0123",
          "arg": "hf_FAKE_token_from_argument_0123"}  # fake, shaped so no scanner takes them for real


def job_env(root: Path, **extra) -> dict:
    env = {name: None for name in os.environ if name.startswith("SLURM_") or name == "HF_TOKEN"}
    return {**env, "QAD_CHECKPOINT_ROOT": str(root), "PYTHONPATH": str(REPO), **extra}


def checkpoints(root: Path) -> Path:
    return root / RUN / "checkpoints" / "tiny-qwen3"


def metrics_iterations(root: Path) -> list[list[int]]:
    """Iterations logged by each job start, oldest first."""
    files = sorted((root / RUN / "logs").glob("*.jsonl"))
    return [[json.loads(line)["iteration"] for line in f.read_text().splitlines()] for f in files]


def files_containing(directory: Path, needle: str) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def two_node_chain(tmp_path_factory, local_cluster):
    """JOB1: 2 nodes, 6 iterations, token from a file. JOB2 (afterany:JOB1): resumes to 10,
    token from the environment."""
    work = tmp_path_factory.mktemp("chain")
    os.chmod(work, 0o755)
    root = work / "runs"
    token_file = work / "token"
    token_file.write_text(TOKENS["file"])
    first = sbatch(["--nodes=2", str(REPO / "slurm/pretrain.sh"), "--config", "conf.d/tiny-qwen3.conf",
                    "--hf-token-file", str(token_file), "--", "training.train_iters=6",
                    "checkpoint.save_interval=3"], cwd=work, env=job_env(root))
    second = sbatch([f"--dependency=afterany:{first}", "--nodes=2", str(REPO / "slurm/pretrain.sh"),
                     "--config", "conf.d/tiny-qwen3.conf", "--", "training.train_iters=10",
                     "checkpoint.save_interval=5"], cwd=work, env=job_env(root, HF_TOKEN=TOKENS["env"]))
    wait_for_state(second, {"COMPLETED"}, timeout_s=240)
    return work, root, first, second


def test_two_node_job_trains_across_both_nodes(two_node_chain):
    work, root, first, _ = two_node_chain
    assert job_state(first) == "COMPLETED"
    assert job_field(first, "NodeList") == "node[1-2]"
    slurm_logs = sorted((root / "logs_slurm").iterdir())
    names = [p.name for p in slurm_logs]
    pattern = rf"(err_)?local-pretrain_{first}_\d{{8}}_\d{{6}}\.log"
    assert len([n for n in names if re.fullmatch(pattern, n)]) == 2, names
    out = next(p for p in slurm_logs if re.fullmatch(rf"local-pretrain_{first}_.*", p.name)).read_text()
    assert "world size 4 (2 nodes x 2 procs)" in out
    err = next(p for p in slurm_logs if p.name.startswith(f"err_local-pretrain_{first}_")).read_text()
    assert "--node-rank=0" in err and "--node-rank=1" in err
    logs = root / RUN / "logs"
    assert list(logs.glob("tiny-qwen3_pretrain_*.log")) and list(logs.glob("tiny-qwen3_*.env.log"))
    assert (work / f"pretrain_{first}.log").is_file() and (work / f"err_pretrain_{first}.log").is_file()


def test_dependent_job_resumes_at_the_next_iteration(two_node_chain):
    _, root, first, second = two_node_chain
    assert metrics_iterations(root) == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    assert (checkpoints(root) / "latest_checkpointed_iteration.txt").read_text().strip() == "10"


def test_interactive_launcher_through_srun(local_cluster, tmp_path):
    root = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(QAD_CHECKPOINT_ROOT=str(root), NUM_GPUS="1")
    result = subprocess.run(["srun", "--nodes=2", "--ntasks-per-node=1", "--time=5", "bash",
                             str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--",
                             "training.train_iters=3"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size 2 (2 nodes x 1 procs)" in result.stdout
    assert (checkpoints(root) / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def training_job(workdir: Path, sbatch_options: list[str], overrides: list[str]) -> int:
    """A tiny-qwen3 pretraining job into workdir/runs, once it has logged iteration 3."""
    job = sbatch([*sbatch_options, str(REPO / "slurm/pretrain.sh"), "--config", "tiny-qwen3", "--", *overrides],
                 cwd=workdir, env=job_env(workdir / "runs"))
    log = workdir / f"pretrain_{job}.log"
    deadline = time.time() + 120
    while not (log.is_file() and "iter 3 |" in log.read_text()):
        assert time.time() < deadline and job_state(job) in {"PENDING", "RUNNING", "CONFIGURING"}, job_state(job)
        time.sleep(0.2)
    return job


def test_usr2_saves_requeues_and_the_job_finishes(slurm_workdir):
    root = slurm_workdir / "runs"
    job = training_job(slurm_workdir, ["--nodes=2"], ["training.train_iters=60", "checkpoint.save_interval=1000"])
    subprocess.run(["scancel", "--batch", "--signal=USR2", str(job)], check=True)
    wait_for_state(job, {"COMPLETED"}, timeout_s=240, terminal_is_error=False)
    assert job_field(job, "Restarts") == "1"
    stops = sorted((root / RUN / "logs").glob("stop_*.json"))
    first_stop = json.loads(stops[0].read_text())
    assert first_stop["reason"] == "signal" and first_stop["requeue"] is True
    runs = metrics_iterations(root)
    assert len(runs) == 2 and runs[0][-1] == first_stop["iteration"] < 60
    assert runs[1] == list(range(first_stop["iteration"] + 1, 61))
    assert "requeueing job" in (slurm_workdir / f"err_pretrain_{job}.log").read_text()


def job_workers(job: int) -> dict[int, str]:
    """{pid: command line} of the job's training processes (torchrun's workers) on this machine."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"SLURM_JOB_ID={job}\0".encode() in (proc / "environ").read_bytes():
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "-m train.pretrain" in command and "torchrun" not in command:
                    found[int(proc.name)] = command
        except OSError:
            continue
    return found


def test_usr1_dumps_stacks_and_a_stopped_worker_ends_the_job_with_its_line_last(slurm_workdir):
    """scancel --signal=USR1 --batch: every worker appends its Python stacks and trains on. Then one
    worker stopped: the job ends FAILED, ExitCode 5:0 (the hang), one `error:` line naming the rank, last."""
    root = slurm_workdir / "runs"
    job = training_job(slurm_workdir, [], ["training.train_iters=100000", "checkpoint.save_interval=100000",
                                           "DIST_TIMEOUT_S=20"])
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    stacks = [root / RUN / "logs" / f"stacks_{name}" for name in ("*_rank0.txt", "*_rank1.txt")]
    deadline = time.time() + 60
    while not all(any("train/trainer.py" in f.read_text() for f in path.parent.glob(path.name)) for path in stacks):
        assert time.time() < deadline, "no stacks from both ranks after USR1"
        time.sleep(0.5)
    assert job_state(job) == "RUNNING"  # USR1 stopped nothing
    workers = job_workers(job)
    assert len(workers) == 2, workers
    stopped = max(workers)
    os.kill(stopped, signal.SIGSTOP)
    try:
        assert wait_for_state(job, {"FAILED"}, timeout_s=120, terminal_is_error=False) == "FAILED"
    finally:
        for pid in job_workers(job):
            os.kill(pid, signal.SIGKILL)
    assert job_field(job, "ExitCode") == "5:0"
    err = Path(job_field(job, "StdErr")).read_text().rstrip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {stopped};" in errors[0] and "stopped responding" in errors[0], err[-30:]
    assert err[-1] == errors[0]


BAD = {
    "missing_required": ("export STUDENT_MODEL=a\nexport TEACHER_MODEL=b\n", "qad", "STUDENT_CKPT"),
    "not_an_integer": ("export MODEL=tiny-qwen3\nexport MBS=x\n", "pretrain", "MBS='x' is not an integer"),
    "tp_does_not_divide": ("export MODEL=tiny-qwen3\nexport NUM_GPUS=2\nexport TP_SIZE=3\nexport DATASET_NAME=synthetic\n",
                           "pretrain", "does not divide"),
    "ep_not_dividing": ("export MODEL=tiny-qwen3\nexport NUM_GPUS=2\nexport EP_SIZE=2\nexport DATASET_NAME=synthetic\n",
                        "pretrain", "EP_SIZE=2"),
    "unsourceable": ("export MODEL=tiny-qwen3\nfi\n", "pretrain", "bash cannot parse"),
    "missing_checkpoint": ("export MODEL=tiny-qwen3\nexport BASE_CKPT=/nonexistent/base\nexport DATASET_NAME=synthetic\n",
                           "finetune", "/nonexistent/base"),
    "missing_blend": ("export MODEL=tiny-qwen3\nexport DATASET_NAME=absent\n", "pretrain", "datablend_absent.json"),
}


def test_every_validation_rule_fails_the_job_before_any_step(slurm_workdir):
    """sbatch queues the script itself; the launcher must then stop with exit 2 before srun."""
    jobs = {}
    for case, (text, job, _) in BAD.items():
        conf = slurm_workdir / f"{case}.conf"
        conf.write_text(text)
        jobs[case] = sbatch([str(REPO / f"slurm/{job}.sh"), "--config", str(conf)], cwd=slurm_workdir,
                            env=job_env(slurm_workdir / "runs", DATACACHE_DIR=str(slurm_workdir)))
    for case, job_id in jobs.items():
        assert wait_for_state(job_id, {"FAILED"}, timeout_s=60, terminal_is_error=False) == "FAILED", case
        assert job_field(job_id, "ExitCode") == "2:0", case
        err = Path(job_field(job_id, "StdErr")).read_text()
        assert "error:" in err and BAD[case][2] in err and str(slurm_workdir / f"{case}.conf") in err, err
        assert "srun" not in err and "Traceback" not in err
    assert not (slurm_workdir / "runs").exists()


def test_a_failure_only_a_worker_sees_ends_the_job_with_exit_2_and_its_line_last(slurm_workdir):
    """Another model's weights under a trained run's name: the plan resumes, the workers refuse the
    checkpoint's shapes. Through torchrun, srun and the batch script: exit 2, the worker's one
    `error:` line after srun's report, no traceback."""
    root = slurm_workdir / "runs"
    first = sbatch([str(REPO / "slurm/pretrain.sh"), "--config", "conf.d/tiny-qwen3.conf", "--",
                    "training.train_iters=2", "checkpoint.save_interval=2"], cwd=slurm_workdir, env=job_env(root))
    wait_for_state(first, {"COMPLETED"}, timeout_s=180)
    other = slurm_workdir / "other-model"
    subprocess.run([sys.executable, "-m", "train.models.random_hf", "tiny-llama3", str(other)], cwd=REPO,
                   check=True, capture_output=True)
    second = sbatch([str(REPO / "slurm/pretrain.sh"), "--config", "conf.d/tiny-qwen3.conf", "--",
                     "training.train_iters=4", f"model.hf_checkpoint={other}"], cwd=slurm_workdir, env=job_env(root))
    assert wait_for_state(second, {"FAILED"}, timeout_s=180, terminal_is_error=False) == "FAILED"
    assert job_field(second, "ExitCode") == "2:0"
    err = Path(job_field(second, "StdErr")).read_text().rstrip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and "does not match this model" in errors[0], "\n".join(err[-30:])
    assert err[-1] == errors[0] and not any("Traceback" in line for line in err)


def test_submit_validates_before_queueing_and_chains(slurm_workdir):
    bad = slurm_workdir / "bad.conf"
    bad.write_text("export JOB=pretrain\nexport MODEL=tiny-qwen3\nexport MBS=x\n")
    queued = set(squeue_ids())
    result = subprocess.run([sys.executable, "-m", "train.submit", "--config", str(bad)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "MBS='x'" in result.stderr
    assert set(squeue_ids()) == queued

    env = {**os.environ, "QAD_CHECKPOINT_ROOT": str(slurm_workdir / "runs")}
    result = subprocess.run([sys.executable, "-m", "train.submit", "--config", "tiny-qwen3", "--chain", "2",
                             "--nodes=1", f"--chdir={slurm_workdir}", "--", "training.train_iters=4",
                             "checkpoint.save_interval=2"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first, second = map(int, result.stdout.split())
    assert job_field(second, "Dependency") in (f"afterany:{first}(unfulfilled)", "(null)")
    wait_for_state(second, {"COMPLETED"}, timeout_s=180)
    root = slurm_workdir / "runs"
    assert metrics_iterations(root)[0] == [1, 2, 3, 4] and metrics_iterations(root)[1] == []


def test_tokens_never_reach_the_run_dir_or_logs(two_node_chain, slurm_workdir):
    work, root, *_ = two_node_chain
    arg_root = slurm_workdir / "runs"
    job = sbatch([str(REPO / "slurm/pretrain.sh"), "--hf-token", TOKENS["arg"], "--config", "tiny-qwen3", "--",
                  "training.train_iters=2"], cwd=slurm_workdir, env=job_env(arg_root))
    wait_for_state(job, {"COMPLETED"}, timeout_s=120)
    assert "SLURM stores" in (slurm_workdir / f"err_pretrain_{job}.log").read_text()
    for directory, token in ((root, TOKENS["file"]), (root, TOKENS["env"]), (arg_root, TOKENS["arg"])):
        assert files_containing(directory, token) == []
        assert files_containing(directory.parent, token) in ([], [str(directory.parent / "token")])
    env_logs = list((root / RUN / "logs").glob("*.env.log")) + list((arg_root / RUN / "logs").glob("*.env.log"))
    assert len(env_logs) == 3 and all("HF_TOKEN=<redacted>" in p.read_text() for p in env_logs)


def test_hydra_multirun_sweep_through_submitit(slurm_workdir):
    """The README's LR sweep: one SLURM job per value through hydra-submitit-launcher."""
    root = slurm_workdir / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, "-m", "train.pretrain", "-m", "hydra/launcher=submitit_slurm",
                             f"hydra.sweep.dir={slurm_workdir / 'sweep'}", "hydra.launcher.timeout_min=5",
                             "optim.lr=1e-3,2e-3", "training.train_iters=2", f"checkpoint.root={root}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for lr in ("0.001", "0.002"):
        tracker = root / f"tiny-qwen3-pretrain-Data-synthetic-lr{lr}" / "checkpoints/tiny-qwen3/latest_checkpointed_iteration.txt"
        assert tracker.read_text().strip() == "2"


def test_preprocess_job_feeds_a_two_node_pretraining_job(slurm_workdir):
    """slurm/preprocess.sh writes Megatron files; a datablend names them; the pretraining
    job reads them, with TRAIN_SAMPLES (so the iterations) taken from the blend."""
    sys.path.insert(0, str(REPO / "tests" / "unit"))
    from hf_fixtures import save_tiny_tokenizer

    tokenizer = save_tiny_tokenizer(slurm_workdir / "tokenizer")
    data = slurm_workdir / "data"
    data.mkdir()
    words = "the cat sat on a mat while dogs ran far away from home".split()
    docs = [" ".join(words[(i + j) % len(words)] for j in range(20 + i % 15)) for i in range(300)]
    (slurm_workdir / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    job = sbatch([str(REPO / "slurm/preprocess.sh"), "--", f"input={slurm_workdir / 'docs.jsonl'}",
                  f"output_prefix={data / 'demo'}", f"tokenizer={tokenizer}", "workers=1"],
                 cwd=slurm_workdir, env=job_env(slurm_workdir))
    wait_for_state(job, {"COMPLETED"}, timeout_s=120)
    prefix = data / "demo_text_document"
    assert prefix.with_suffix(".bin").is_file() and prefix.with_suffix(".idx").is_file()
    (data / "datablend_demo.json").write_text(json.dumps({"train": [1.0, str(prefix)]}))

    root = slurm_workdir / "runs"
    job = sbatch(["--nodes=2", str(REPO / "slurm/pretrain.sh"), "--config", "tiny-qwen3", "--",
                  "training.train_iters=null"], cwd=slurm_workdir,
                 env=job_env(root, DATASET_NAME="demo", DATACACHE_DIR=str(data)))
    wait_for_state(job, {"COMPLETED"}, timeout_s=180)
    from train.data.blend import train_samples_for_blend

    samples = train_samples_for_blend(str(data / "datablend_demo.json"), 64)
    out = next((root / "logs_slurm").glob(f"local-pretrain_{job}_*.log")).read_text()
    assert f"train samples {samples}" in out
    tracker = root / "tiny-qwen3-pretrain-Data-demo-lr0.001/checkpoints/tiny-qwen3/latest_checkpointed_iteration.txt"
    assert int(tracker.read_text()) == samples // 8  # GBS = MBS 2 x 4 ranks
