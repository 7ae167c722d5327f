"""python -m pytest tests/unit/test_launch_plan_file.py  (the plan hand-off: plan file, worker checks)

The launcher plans once and writes the plan file; workers read it (train/launch/job.py)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from train.launch.conf import CONF_VARIABLES
from train.launch.job import current_resume, plan_from_rank0, read_plan_file
from train.launch.plan import JobPlan, PlanError, compose_config, config_fingerprint, plan_from_conf
from train.launch.rundir import TRACKER_FILE, RunPaths

REPO = Path(__file__).resolve().parents[2]
STAMP = "20250102_030405"
TOKEN = "hf_FAKE_plan_file_test_value"
CONF = ("export MODEL=tiny-qwen3\nexport DATASET_NAME=synthetic\nexport SEQ_LENGTH=64\nexport MBS=2\n"
        "export NUM_GPUS=2\nexport NCCL_DEBUG='INFO warn'\nunset DROPPED_BY_CONF\n"
        f"export HF_TOKEN={TOKEN}\n")


@pytest.fixture(autouse=True)
def clean_os_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_") or name in CONF_VARIABLES or name in ("RUN_DATETIME", "TRAIN_PLAN_FILE"):
            monkeypatch.delenv(name)


@pytest.fixture
def env(tmp_path):
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "QAD_CHECKPOINT_ROOT": str(tmp_path / "runs"), "RUN_DATETIME": STAMP, "DROPPED_BY_CONF": "x"}


@pytest.fixture
def conf(tmp_path) -> str:
    path = tmp_path / "test.conf"
    path.write_text(CONF)
    return str(path)


def test_plan_json_round_trip(conf, env):
    plan, _, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env)
    again = JobPlan.from_json(plan.to_json())
    assert again == plan
    assert isinstance(again.paths, RunPaths) and isinstance(again.paths.checkpoints, Path)
    assert again.paths.plan_file == plan.paths.run_dir / "plans" / f"plan_{STAMP}_nojob.json"
    assert again.cluster.world_size == 2 and again.train_iters == 3
    assert TOKEN not in plan.to_json()  # the conf's environment (HF_TOKEN) never reaches the file


def test_worker_config_matches_the_plan_fingerprint_and_a_different_one_does_not(conf, env):
    plan, overrides, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env)
    worker_cfg = compose_config("pretrain", overrides)  # what torchrun's workers compose
    assert config_fingerprint(worker_cfg) == plan.config_fingerprint
    assert config_fingerprint(compose_config("pretrain", [*overrides, "optim.lr=0.5"])) != plan.config_fingerprint


def write_plan(tmp_path, plan: JobPlan) -> str:
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    return str(path)


@pytest.mark.parametrize("job,extra,world,expected", [
    ("pretrain", ["training.train_iters=4"], 2, "planned for config"),
    ("pretrain", [], 4, "torchrun started 4 processes, the plan has 1 node(s) x 2 = 2"),
    ("finetune", [], 2, "a plan for a pretrain job, this is finetune"),
])
def test_a_plan_for_another_job_is_refused_with_one_error_line(job, extra, world, expected, tmp_path, conf, env,
                                                               capsys):
    plan, overrides, _ = plan_from_conf("pretrain", conf, ["training.train_iters=3"], env)
    path = write_plan(tmp_path, plan)
    with pytest.raises(SystemExit) as exit_info:
        read_plan_file(path, job, compose_config("pretrain", overrides + extra), world)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: TRAIN_PLAN_FILE={path}: ") and expected in lines[0]
    assert read_plan_file(path, "pretrain", compose_config("pretrain", overrides), 2) == plan


def test_rank0_sees_a_checkpoint_saved_after_the_plan(tmp_path, conf, env):
    plan, overrides, _ = plan_from_conf("pretrain", conf, [], env)
    assert plan.resume.decision == "from_scratch"
    (plan.paths.checkpoints / "iter_0000006").mkdir(parents=True)
    (plan.paths.checkpoints / TRACKER_FILE).write_text("6\n")
    now = current_resume(plan, compose_config("pretrain", overrides))
    assert (now.resume.decision, now.resume.iteration) == ("resume", 6)
    assert now.paths == plan.paths and now.config_fingerprint == plan.config_fingerprint


def test_a_planning_error_on_rank0_exits_2(capsys):
    def broken():
        raise PlanError("test.conf: GBS=3 is not a multiple of MBS x data-parallel size = 2 x 2")

    with pytest.raises(SystemExit) as exit_info:
        plan_from_rank0(broken)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: test.conf: GBS=3 is not a multiple of MBS x data-parallel size = 2 x 2\n"


def test_launcher_shell_output_writes_the_plan_and_exports_the_conf_as_sourcing_would(tmp_path, conf, env):
    """What lib.sh evals instead of sourcing the conf a second time: the same exported environment."""
    environment = {**os.environ, **env}
    plan_cmd = (f'eval "$({shlex.quote(sys.executable)} -m train.launch.plan --job pretrain --config {conf} '
                '--format shell --write-plan)" || exit 9')
    sourced = f'set -a +u; source {conf}; set +a -u'
    dump = 'printf "%s\\n" "$TRAIN_PLAN_FILE" >&2; env -0 | sort -z'
    planned = subprocess.run(["bash", "-c", f"{plan_cmd}\n{dump}"], capture_output=True, text=True,
                             env=environment, cwd=REPO, timeout=120)
    assert planned.returncode == 0, planned.stderr
    plan_file = Path(planned.stderr.splitlines()[-1])
    assert plan_file == tmp_path / "runs" / "tiny-qwen3-Data-synthetic-lr0.0003" / "plans" / f"plan_{STAMP}_nojob.json"
    assert json.loads(plan_file.read_text())["resume"]["decision"] == "from_scratch"
    assert TOKEN not in plan_file.read_text()
    reference = subprocess.run(["bash", "-c", f"{sourced}\nenv -0 | sort -z"], capture_output=True, text=True,
                               env=environment, cwd=REPO, timeout=60)

    def conf_part(dump_text: str) -> dict[str, str]:
        names = {"MODEL", "DATASET_NAME", "SEQ_LENGTH", "MBS", "NUM_GPUS", "NCCL_DEBUG", "HF_TOKEN", "DROPPED_BY_CONF"}
        pairs = (item.split("=", 1) for item in dump_text.split("\0") if "=" in item)
        return {k: v for k, v in pairs if k in names}

    assert conf_part(planned.stdout) == conf_part(reference.stdout)
    assert conf_part(planned.stdout)["NCCL_DEBUG"] == "INFO warn" and "DROPPED_BY_CONF" not in conf_part(planned.stdout)


def test_a_dry_run_with_a_missing_kd_file_still_plans(tmp_path, env):
    conf = tmp_path / "qad.conf"
    conf.write_text(f"export STUDENT_MODEL=tiny-qwen3\nexport TEACHER_MODEL=tiny-qwen3\nexport STUDENT_CKPT={tmp_path}/s\n"
                    f"export TEACHER_CKPT={tmp_path}/t\nexport TP_SIZE=1\nexport MBS=2\nexport NUM_GPUS=2\n"
                    f"export DATASET_NAME=synthetic\nexport KD_CFG_PATH={tmp_path}/kd.yaml\n")
    plan = plan_from_conf("qad", str(conf), [], env, strict_paths=False)[0]
    assert any("KD_CFG_PATH" in problem for problem in plan.path_problems) and plan.config_fingerprint
