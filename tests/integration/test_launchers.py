"""python -m pytest tests/integration/test_launchers.py  (real bash launchers, torchrun, gloo; no SLURM)"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from train.models import random_hf

REPO = Path(__file__).resolve().parents[2]
TOKEN = "hf_FAKE_test_secret_integration_value"  # shaped so no scanner takes it for a real token


def launcher_env(root: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK",
                                                                     "MASTER_", "HF_TOKEN"))}
    env.update({"QAD_CHECKPOINT_ROOT": str(root), "MODELS_ROOT": str(root / "models"), **extra})
    return env


def run_launcher(job: str, args: list[str], env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launchers" / f"{job}.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_dir(root: Path, name: str = "tiny-qwen3-pretrain-Data-synthetic-lr0.001") -> Path:
    return root / name


def files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One standalone run of 4 iterations with a token file, then a resumed run to 6."""
    root = tmp_path_factory.mktemp("runs")
    token_file = root.parent / "token.txt"
    token_file.write_text(TOKEN + "\n")
    env = launcher_env(root)
    first = run_launcher("pretrain", ["--config", "tiny-qwen3", "--hf-token-file", str(token_file), "--",
                                      "training.train_iters=4", "checkpoint.save_interval=2"], env)
    second = run_launcher("pretrain", ["--config", "tiny-qwen3", "--",
                                       "training.train_iters=6", "checkpoint.save_interval=2"], env)
    return root, first, second


@pytest.mark.slow
def test_standalone_run_writes_the_design_layout(trained):
    root, first, _ = trained
    assert first.returncode == 0, first.stderr[-3000:]
    directory = run_dir(root)
    checkpoints = directory / "checkpoints" / "tiny-qwen3"
    # both runs of the fixture: 4 iterations, then resumed to 6; keep_last=3
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002", "iter_0000004", "iter_0000006"]
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert list((directory / "tensorboard" / "tiny-qwen3").glob("events.out.tfevents.*"))
    logs = directory / "logs"
    assert len(list(logs.glob("tiny-qwen3_pretrain_*.config.yaml"))) == 2
    assert len(list(logs.glob("tiny-qwen3_*.env.log"))) == 2
    assert "world size 2 (1 nodes x 2 procs)" in first.stderr + first.stdout
    plans = sorted((directory / "plans").glob("plan_*_nojob.json"))
    assert len(plans) == 2  # one per launch, read by its workers
    assert f"plan read from the launcher's {plans[0]}" in first.stdout + first.stderr


@pytest.mark.slow
def test_token_from_file_is_redacted_everywhere(trained):
    root, first, _ = trained
    env_logs = sorted((run_dir(root) / "logs").glob("*.env.log"))
    assert "HF_TOKEN=<redacted>" in env_logs[0].read_text()
    assert files_containing(root, TOKEN) == []
    assert TOKEN not in first.stdout + first.stderr


@pytest.mark.slow
def test_second_run_resumes_at_the_next_iteration(trained):
    root, _, second = trained
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "resume at iteration 4" in output
    metrics = sorted((run_dir(root) / "logs").glob("*.jsonl"))
    iterations = [json.loads(line)["iteration"] for line in metrics[-1].read_text().splitlines()]
    assert iterations == [5, 6]


def launcher_plan(root: Path, datetime: str, *overrides: str) -> tuple[dict, list[str]]:
    """What lib.sh does first: plan and write the plan file. Returns (plan, the workers' overrides)."""
    result = subprocess.run([sys.executable, "-m", "train.launch.plan", "--job", "pretrain", "--config", "tiny-qwen3",
                             "--format", "shell", "--write-plan", "--", *overrides], cwd=REPO,
                            env=launcher_env(root, RUN_DATETIME=datetime), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path = next(line.partition("=")[2] for line in result.stdout.splitlines() if line.startswith("TRAIN_PLAN_FILE="))
    plan = json.loads(Path(path).read_text())
    command = plan["node_commands"][0]
    return plan, command[command.index("train.pretrain") + 1:]


def moved_plan(plan: dict, to: Path) -> Path:
    """The plan with its run directory somewhere re-planning would never put it."""
    text = json.dumps(plan).replace(plan["paths"]["run_dir"], str(to))
    path = to.parent / f"moved_{plan['paths']['datetime']}.json"
    path.write_text(text)
    return path


def run_workers(plan_file: Path, overrides: list[str], root: Path) -> str:
    """torchrun with 2 gloo processes, as node.sh starts them."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "train.pretrain", *overrides], cwd=REPO, capture_output=True, text=True,
                            env=launcher_env(root, TRAIN_PLAN_FILE=str(plan_file), OMP_NUM_THREADS="1"), timeout=240)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_workers_train_where_the_plan_file_says_and_rank0_rechecks_resume(tmp_path):
    """Workers that planned again would write under root/<run name>; the plan file says moved/."""
    root, moved = tmp_path / "runs", tmp_path / "moved"
    first, first_overrides = launcher_plan(root, "20250101_000001", "training.train_iters=4", "checkpoint.save_interval=2")
    # planned before the first run has saved anything: from_scratch, stale once the first run is done
    second, second_overrides = launcher_plan(root, "20250101_000002", "training.train_iters=6", "checkpoint.save_interval=2")
    assert first["resume"]["decision"] == second["resume"]["decision"] == "from_scratch"
    first_file, second_file = moved_plan(first, moved), moved_plan(second, moved)
    output = run_workers(first_file, first_overrides, root)
    checkpoints = moved / "checkpoints" / "tiny-qwen3"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not (run_dir(root) / "checkpoints").exists() and not (run_dir(root) / "logs").exists()
    assert f"plan read from the launcher's {first_file}" in output
    output = run_workers(second_file, second_overrides, root)
    assert "resume decision changed since the plan: from_scratch at iteration 0, now resume at iteration 4" in output
    metrics = moved / "logs" / "tiny-qwen3_pretrain_20250101_000002.jsonl"
    assert [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()] == [5, 6]
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


def test_a_planning_error_on_rank0_stops_both_workers(tmp_path):
    """No plan file (torchrun by hand): rank 0 plans; its error reaches rank 1 instead of a hang."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             "-m", "train.pretrain", f"checkpoint.root={tmp_path}", "training.micro_batch_size=2",
                             "training.global_batch_size=6"], cwd=REPO, capture_output=True, text=True,
                            env=launcher_env(tmp_path, OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode != 0
    error = "error: <command line>: GBS=6 is not a multiple of MBS x data-parallel size = 2 x 2"
    assert result.stderr.count(error) == 2, result.stderr[-3000:]
    assert not tmp_path.joinpath("tiny-qwen3-pretrain-Data-synthetic-lr0.0003").exists()


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    result = run_launcher("pretrain", ["--config", "tiny-qwen3", "--dry-run"], launcher_env(tmp_path))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["world_size"] == 2 and plan["resume"]["decision"] == "from_scratch"
    assert plan["node_commands"][0].startswith("torchrun --nnodes=1 --node-rank=0 --nproc-per-node=2")
    assert plan["run_dir"] == str(tmp_path / "tiny-qwen3-pretrain-Data-synthetic-lr0.001")
    assert list(tmp_path.iterdir()) == []


def test_dry_run_scaling_prints_one_row_per_node_count_and_creates_nothing(tmp_path):
    """The QAD conf of the users' guide (GBS 32, 8 GPUs a node) at 1, 2 and 8 nodes; --scaling
    alone (no --dry-run) is refused."""
    result = run_launcher("qad", ["--config", "qwen3-8b", "--dry-run", "--scaling", "1,2,8"], launcher_env(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "8"]
    assert "| 8 (fsdp) | 4 |" in rows[0] and "| 16 (fsdp) | 2 |" in rows[1] and "refused: GBS=32" in rows[2]
    assert list(tmp_path.iterdir()) == []
    refused = run_launcher("qad", ["--config", "qwen3-8b", "--scaling", "1,2"], launcher_env(tmp_path))
    assert refused.returncode == 2 and refused.stderr == "error: --scaling needs --dry-run\n"


BAD_CONFS = {
    "missing_required": ("export STUDENT_MODEL=a\nexport TEACHER_MODEL=b\nexport TP_SIZE=1\n", "qad",
                         ["STUDENT_CKPT", "TEACHER_CKPT", "MBS"]),
    "not_an_integer": ("export MODEL=tiny-qwen3\nexport MBS=two\n", "pretrain", ["MBS='two'", "not an integer"]),
    "tp_does_not_divide": ("export MODEL=tiny-qwen3\nexport NUM_GPUS=2\nexport TP_SIZE=4\n", "pretrain",
                           ["TP_SIZE x PP_SIZE", "does not divide"]),
    "ep_on_dense": ("export MODEL=tiny-qwen3\nexport NUM_GPUS=2\nexport EP_SIZE=2\n", "pretrain",
                    ["EP_SIZE=2", "dense"]),
    "unsourceable": ("export MODEL=tiny-qwen3\nif then\n", "pretrain", ["bash cannot parse", "line 2"]),
    "missing_checkpoint": ("export STUDENT_MODEL=a\nexport TEACHER_MODEL=b\nexport STUDENT_CKPT=/nonexistent/s\n"
                           "export TEACHER_CKPT=/nonexistent/t\nexport TP_SIZE=1\nexport MBS=1\n"
                           "export DATASET_NAME=synthetic\n", "qad", ["STUDENT_CKPT", "/nonexistent/s", "/nonexistent/t"]),
    "missing_blend": ("export MODEL=tiny-qwen3\nexport DATASET_NAME=nope\n", "pretrain",
                      ["BLEND_PATH", "datablend_nope.json"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFS))
def test_bad_conf_exits_2_with_one_clear_message_and_no_run_dir(case, tmp_path):
    text, job, expected = BAD_CONFS[case]
    conf = tmp_path / f"{case}.conf"
    conf.write_text(text)
    root = tmp_path / "runs"
    result = run_launcher(job, ["--config", str(conf)], launcher_env(root, DATACACHE_DIR=str(tmp_path)))
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and str(conf) in result.stderr
    for fragment in expected:
        assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not root.exists()


def test_typo_in_a_variable_name_warns(tmp_path):
    conf = tmp_path / "typo.conf"
    conf.write_text("export MODEL=tiny-qwen3\nexport DATASET_NAME=synthetic\nexport TP_SZE=1\n")
    result = run_launcher("pretrain", ["--config", str(conf), "--dry-run"], launcher_env(tmp_path / "r"))
    assert result.returncode == 0
    assert "TP_SZE: did you mean TP_SIZE?" in result.stderr


def test_hf_token_argument_warns_that_slurm_stores_it(tmp_path):
    result = run_launcher("pretrain", ["--hf-token", TOKEN, "--config", "tiny-qwen3", "--dry-run"],
                          launcher_env(tmp_path))
    assert result.returncode == 0
    assert "scontrol show job" in result.stderr and TOKEN not in result.stdout + result.stderr


@pytest.mark.slow
def test_usr2_saves_at_the_current_iteration_and_stops(tmp_path):
    env = launcher_env(tmp_path)
    process = subprocess.Popen(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--",
                                "training.train_iters=100000", "checkpoint.save_interval=100000"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if "iter 3 |" in line:
            process.send_signal(signal.SIGUSR2)
            break
    output.extend(process.stdout)
    assert process.wait(timeout=120) == 0, "".join(output)[-3000:]
    checkpoints = run_dir(tmp_path) / "checkpoints" / "tiny-qwen3"
    saved = int((checkpoints / "latest_checkpointed_iteration.txt").read_text())
    assert 3 <= saved < 100000
    stop = json.loads(next((run_dir(tmp_path) / "logs").glob("stop_*.json")).read_text())
    assert stop == {"reason": "signal", "iteration": saved, "requeue": True, "signal": "SIGUSR2"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_manual_multi_node_two_launchers_meet(tmp_path):
    common = dict(NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), NUM_GPUS="1",
                  RUN_DATETIME="20260101_000000")
    args = ["--config", "tiny-qwen3", "--", "training.train_iters=2"]
    nodes = [subprocess.Popen(["bash", str(REPO / "launchers/pretrain.sh"), *args], cwd=REPO,
                              env=launcher_env(tmp_path, NODE_RANK=str(rank), **common),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=180)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "world size 2 (2 nodes x 1 procs)" in outputs[0]
    assert (run_dir(tmp_path) / "checkpoints/tiny-qwen3/latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models")
    assert random_hf.main(["tiny-qwen3", str(models / "tiny-qwen3")]) == 0  # in this process: no start-up
    return models


@pytest.mark.slow
@pytest.mark.parametrize("job,conf,run_name", [
    ("qad", "tiny-qwen3-qad", "tiny-qwen3-Teacher-tiny-qwen3-Data-synthetic-lr0.0001"),
    ("finetune", "tiny-qwen3-lora", "tiny-qwen3-finetune-Data-synthetic-lr0.001"),
])
def test_qad_and_finetune_jobs_start_from_the_hf_checkpoint(job, conf, run_name, tiny_hf, tmp_path):
    env = launcher_env(tmp_path, MODELS_ROOT=str(tiny_hf))
    result = run_launcher(job, ["--config", conf, "--", "training.train_iters=2"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from_checkpoint at iteration 0" in result.stdout + result.stderr
    tracker = tmp_path / run_name / "checkpoints" / "tiny-qwen3" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "2"


def test_bf16_autocast_trains_with_fp32_master_weights(tmp_path):
    """PRECISION=bf16: the forward runs in bf16 (losses differ from fp32), weights stay fp32."""
    def losses(precision: str) -> list[float]:
        root = tmp_path / precision
        result = subprocess.run(["python", "-m", "train.pretrain", f"checkpoint.root={root}", "training.train_iters=3",
                                 f"training.precision={precision}"], cwd=REPO, env=launcher_env(root),
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-2000:]
        jsonl = next(root.glob("*/logs/*.jsonl"))
        return [json.loads(line)["loss"] for line in jsonl.read_text().splitlines()]

    fp32, bf16 = losses("fp32"), losses("bf16")
    assert all(abs(a - b) < 0.05 for a, b in zip(fp32, bf16)) and fp32 != bf16
    import torch
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(next((tmp_path / "bf16").glob("*/checkpoints/*/iter_0000003")))).read_metadata()
    dtypes = {m.properties.dtype for k, m in metadata.state_dict_metadata.items() if k.startswith("model.")}
    assert dtypes == {torch.float32}  # the saved (master) weights
