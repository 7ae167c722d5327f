"""python -m pytest tests/unit/test_launch_arguments.py  (launchers/lib.sh's arguments: the QAD guide's
positional form, conf variables on the command line, a --config that is not a bash conf; --dry-run only)"""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QAD_POSITIONAL = ["LR", "TEACHER_MODEL", "DATASET_NAME", "STUDENT_MODEL", "KD_CFG_PATH"]


@pytest.fixture
def qad_conf(tmp_path) -> Path:
    """A QAD conf whose LR, models and data the command line replaces (checkpoint directories exist)."""
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
    (tmp_path / "kd.yaml").write_text("temperature: 2.0\n")
    conf = tmp_path / "qad.conf"
    conf.write_text(f"export STUDENT_MODEL=tiny-qwen3\nexport TEACHER_MODEL=tiny-qwen3\n"
                    f"export STUDENT_CKPT={tmp_path / 'student'}\nexport TEACHER_CKPT={tmp_path / 'teacher'}\n"
                    "export TP_SIZE=1\nexport MBS=1\nexport NUM_GPUS=1\nexport LR=1e-4\n"
                    "export DATASET_NAME=synthetic\n")
    return conf


def launch(tmp_path: Path, job: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "MASTER_"))}
    env.update(QAD_CHECKPOINT_ROOT=str(tmp_path / "runs"), DATACACHE_DIR=str(tmp_path / "data"),
               RUN_DATETIME="20260101_000000")
    return subprocess.run(["bash", str(REPO / "launchers" / f"{job}.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_qad_guides_positional_form_plans_as_its_named_form(tmp_path, qad_conf):
    values = ["1e-6", "tiny-qwen3-moe", "mix", "tiny-qwen3", str(tmp_path / "kd.yaml")]
    positional = launch(tmp_path, "qad", "--config", str(qad_conf), *values, "--dry-run")
    assert positional.returncode == 0, positional.stderr
    named_form = " ".join(f"{name}={value}" for name, value in zip(QAD_POSITIONAL, values))
    assert f"note: positional arguments read as {named_form} (named form: -- {named_form})" in positional.stderr
    plan = json.loads(positional.stdout)
    assert plan["run_dir"] == str(tmp_path / "runs" / "tiny-qwen3-Teacher-tiny-qwen3-moe-Data-mix-lr1e-6")
    command = plan["node_commands"][0]
    for override in ("optim.lr=1e-06", "distill.teacher_model=tiny-qwen3-moe", "data.dataset_name=mix",
                     "data.source=blend", f"distill.kd_config_path={tmp_path / 'kd.yaml'}"):
        assert override in command
    named = launch(tmp_path, "qad", "--config", str(qad_conf), "--dry-run", "--", *named_form.split())
    assert named.returncode == 0, named.stderr
    assert "note: positional" not in named.stderr
    named_plan = json.loads(named.stdout)
    assert named_plan["run_dir"] == plan["run_dir"]
    overrides = command.split(" -m train.qad ")[1]  # the rendezvous port differs between two standalone plans
    assert named_plan["node_commands"][0].split(" -m train.qad ")[1] == overrides


def test_fewer_positional_values_set_only_the_first_variables(tmp_path, qad_conf):
    result = launch(tmp_path, "qad", "--config", str(qad_conf), "3e-6", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "note: positional arguments read as LR=3e-6 (" in result.stderr
    assert json.loads(result.stdout)["run_dir"].endswith("tiny-qwen3-Teacher-tiny-qwen3-Data-synthetic-lr3e-6")


@pytest.mark.parametrize("job,args,message", [
    ("qad", ["1", "a", "b", "c", "d", "e"], "6 positional values; qad.sh takes at most 5: LR TEACHER_MODEL"),
    ("pretrain", ["3e-4"], "unknown argument: 3e-4 (positional values are for qad.sh)"),
    ("qad", ["--", "LRR=1e-6"], "LRR=1e-6: LRR is not a conf variable (did you mean LR?)"),
])
def test_bad_arguments_exit_2_with_one_error_line(tmp_path, qad_conf, job, args, message):
    result = launch(tmp_path, job, "--config", str(qad_conf), *args, "--dry-run")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name,text", [
    ("kd.yaml", "temperature: 2.0\nlm_loss_weight: 0.5\n"),
    ("settings.conf", "# QAD settings\nmodel:\n  name: tiny-qwen3\n"),  # YAML behind a .conf name
    ("plan.json", '{"LR": "1e-6"}\n'),
])
def test_a_config_that_is_not_a_bash_conf_is_one_error_line(tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    for extra in ([], ["--dry-run"]):
        result = launch(tmp_path, "qad", "--config", str(config), *extra)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            f"error: --config {config}: a YAML/JSON file, not a bash conf (`export VAR=value` lines, as in "
            "conf.d/); KD settings go in KD_CFG_PATH, config keys after `--`"]
    assert not (tmp_path / "runs").exists()
