"""python -m pytest tests/unit/test_launch_rundir.py  (run dir, file names, resume rule: train/launch/rundir.py)"""

import json
import os
import re
import socket
import time

import pytest

from train.launch.rundir import (
    MANIFEST_FILE,
    TRACKER_FILE,
    ResumeError,
    checkpoint_dir_name,
    checkpoint_manifest,
    checkpoint_problem,
    env_log_text,
    format_lr,
    legacy_note,
    load_templates,
    read_tracker,
    resume_state,
    run_paths,
)

STAMP = "20250102_030405"
SLURM = {"SLURM_JOB_ACCOUNT": "llmteam", "SLURM_JOB_NAME": "qad-8b", "SLURM_JOB_ID": "4242",
         "RUN_DATETIME": STAMP}


# ----------------------------------------------------------------- learning rates in names

@pytest.mark.parametrize("lr,text", [(1e-6, "1e-6"), ("1e-6", "1e-6"), ("1e-06", "1e-6"), (1e-3, "0.001"),
                                     (3e-4, "0.0003"), (2.5e-5, "2.5e-5"), (1e-10, "1e-10"), (0.1, "0.1"),
                                     (1, "1"), (1e6, "1e+6")])
def test_format_lr(lr, text):
    assert format_lr(lr) == text


# ----------------------------------------------------------------- run paths

def test_qad_run_layout(tmp_path):
    paths = run_paths("qad", model="Qwen3-8B", dataset="combined_v2_cot_chat", lr=1e-6, root=tmp_path,
                      teacher="Qwen3-32B", env=dict(SLURM))
    name = "Qwen3-8B-Teacher-Qwen3-32B-Data-combined_v2_cot_chat-lr1e-6"
    run = tmp_path / name
    assert paths.run_name == name and paths.run_dir == run and paths.root == tmp_path
    assert paths.checkpoints == run / "checkpoints" / "Qwen3-8B"
    assert paths.tensorboard == run / "tensorboard" / "Qwen3-8B"
    assert paths.train_log == run / "logs" / f"Qwen3-8B_qad_{STAMP}.log"
    assert paths.env_log == run / "logs" / f"Qwen3-8B_{STAMP}.env.log"
    assert paths.slurm_log == tmp_path / "logs_slurm" / f"llmteam-qad-8b_4242_{STAMP}.log"
    assert paths.slurm_err == tmp_path / "logs_slurm" / f"err_llmteam-qad-8b_4242_{STAMP}.log"
    assert paths.datetime == STAMP


def test_pretrain_run_name_has_no_teacher(tmp_path):
    paths = run_paths("pretrain", model="tiny-qwen3", dataset="synthetic", lr=1e-3, root=tmp_path,
                      teacher="ignored", env={"RUN_DATETIME": STAMP})
    assert paths.run_name == "tiny-qwen3-pretrain-Data-synthetic-lr0.001"
    assert paths.train_log == tmp_path / paths.run_name / "logs" / f"tiny-qwen3_pretrain_{STAMP}.log"
    assert "ignored" not in str(paths.as_dict())


def test_pretraining_and_fine_tuning_of_one_model_get_their_own_run_dirs(tmp_path):
    names = {job: run_paths(job, model="qwen3-0.6b", dataset="alpaca_chat", lr="2e-4", root=tmp_path, teacher=None,
                            env={"RUN_DATETIME": STAMP}).run_name for job in ("pretrain", "finetune")}
    assert names == {"pretrain": "qwen3-0.6b-pretrain-Data-alpaca_chat-lr0.0002",
                     "finetune": "qwen3-0.6b-finetune-Data-alpaca_chat-lr0.0002"}


def test_an_old_style_run_dir_of_the_same_job_stays_in_use(tmp_path):
    old = tmp_path / "tiny-qwen3-Data-synthetic-lr0.001"
    (old / "logs").mkdir(parents=True)
    (old / "logs" / "tiny-qwen3_pretrain_20250101_000000.log").write_text("")

    def paths(job):
        return run_paths(job, model="tiny-qwen3", dataset="synthetic", lr=1e-3, root=tmp_path, teacher=None,
                         env={"RUN_DATETIME": STAMP})

    assert (paths("pretrain").run_dir, paths("pretrain").legacy) == (old, True)
    assert "old-style run directory" in legacy_note(paths("pretrain"), "pretrain")[0]
    assert paths("finetune").run_name == "tiny-qwen3-finetune-Data-synthetic-lr0.001"  # not its run
    (tmp_path / "tiny-qwen3-pretrain-Data-synthetic-lr0.001").mkdir()
    assert not paths("pretrain").legacy  # a new-style directory exists: it wins


def test_outside_slurm_the_log_names_say_local(tmp_path):
    paths = run_paths("pretrain", model="m", dataset="d", lr=1e-3, root=tmp_path, teacher=None,
                      env={"RUN_DATETIME": STAMP})
    assert paths.slurm_log == tmp_path / "logs_slurm" / f"local-pretrain_nojob_{STAMP}.log"
    assert paths.slurm_err == tmp_path / "logs_slurm" / f"err_local-pretrain_nojob_{STAMP}.log"


def test_datetime_defaults_to_now_and_is_shared_by_every_file(tmp_path):
    before = time.strftime("%Y%m%d_%H%M%S")
    paths = run_paths("qad", model="s", dataset="d", lr=1e-6, root=tmp_path, teacher="t", env={})
    after = time.strftime("%Y%m%d_%H%M%S")
    assert re.fullmatch(r"\d{8}_\d{6}", paths.datetime) and before <= paths.datetime <= after
    for path in (paths.train_log, paths.env_log, paths.metrics_log, paths.resolved_config, paths.slurm_log,
                 paths.slurm_err):
        assert paths.datetime in path.name


def test_relative_root_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = run_paths("pretrain", model="m", dataset="d", lr=1e-3, root="runs", teacher=None,
                      env={"RUN_DATETIME": STAMP})
    assert paths.root == tmp_path / "runs" and paths.run_dir.is_absolute()


def test_every_file_lives_in_its_place(tmp_path):
    paths = run_paths("qad", model="s", dataset="d", lr=1e-6, root=tmp_path, teacher="t", env=dict(SLURM))
    for path in (paths.checkpoints, paths.tensorboard, paths.train_log, paths.metrics_log, paths.env_log,
                 paths.resolved_config):
        assert paths.run_dir in path.parents
    for path in (paths.slurm_log, paths.slurm_err):
        assert path.parent == tmp_path / "logs_slurm"
    assert len({str(p) for p in paths.as_dict().values()}) == len(paths.as_dict())  # no two collide
    assert all(isinstance(v, str) for v in paths.as_dict().values())


def test_create_makes_the_directories_and_can_run_twice(tmp_path):
    paths = run_paths("pretrain", model="m", dataset="d", lr=1e-3, root=tmp_path, teacher=None,
                      env={"RUN_DATETIME": STAMP})
    paths.create()
    paths.create()
    assert paths.checkpoints.is_dir() and paths.tensorboard.is_dir() and paths.train_log.parent.is_dir()
    assert not paths.train_log.exists()


def test_templates_skip_comments():
    templates = load_templates()
    assert templates["RUN_DIR_QAD"] == "${student}-Teacher-${teacher}-Data-${dataset}-lr${lr}"
    assert not any(key.startswith("#") for key in templates)


# ----------------------------------------------------------------- resume rule

def checkpoints_dir(tmp_path, tracker=None, iterations=()):
    checkpoints = tmp_path / "checkpoints" / "m"
    checkpoints.mkdir(parents=True)
    for iteration in iterations:  # an older checkpoint's files (no manifest)
        (checkpoints / checkpoint_dir_name(iteration)).mkdir()
        for name in (".metadata", "trainer.pt", "__0_0.distcp"):
            (checkpoints / checkpoint_dir_name(iteration) / name).write_bytes(b"x" * 10)
    if tracker is not None:
        (checkpoints / TRACKER_FILE).write_text(tracker)
    return checkpoints


def test_megatron_names():
    assert checkpoint_dir_name(200) == "iter_0000200" and TRACKER_FILE == "latest_checkpointed_iteration.txt"


def test_tracker_resumes_at_its_iteration(tmp_path):
    checkpoints = checkpoints_dir(tmp_path, "200\n", [100, 200, 300])  # 300: an unfinished save
    state = resume_state(checkpoints, "/models/initial")
    assert (state.decision, state.iteration, state.path) == ("resume", 200, str(checkpoints / "iter_0000200"))
    assert state.as_dict() == {"decision": "resume", "iteration": 200, "path": str(checkpoints / "iter_0000200"),
                               "skipped": ()}


def test_tracker_naming_a_missing_directory_falls_back_to_the_newest_intact(tmp_path):
    checkpoints = checkpoints_dir(tmp_path, "300", [100, 200])
    state = resume_state(checkpoints, "/models/initial")
    assert (state.decision, state.iteration) == ("resume", 200)
    assert state.skipped == (f"{checkpoints / 'iter_0000300'}: the directory does not exist",)


def test_no_intact_checkpoint_left_is_one_error(tmp_path):
    checkpoints = checkpoints_dir(tmp_path, "300", [100])
    (checkpoints / "iter_0000100" / ".metadata").unlink()
    with pytest.raises(ResumeError) as error:
        resume_state(checkpoints, "/models/initial")
    message = str(error.value)
    assert TRACKER_FILE in message and "iter_0000300: the directory does not exist" in message
    assert "iter_0000100: .metadata missing" in message


def with_manifest(directory, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        (directory / name).write_bytes(bytes(range(256)) * (size // 256) + b"\1" * (size % 256))
    (directory / MANIFEST_FILE).write_text(json.dumps(checkpoint_manifest(directory)))


@pytest.mark.parametrize("damage,reason", [
    (lambda d: os.truncate(d / "__0_0.distcp", 3 << 20), "__0_0.distcp has 3145728 bytes, the manifest says 5242880"),
    (lambda d: (d / "rng_rank1.pt").unlink(), "rng_rank1.pt is missing"),
    (lambda d: overwrite(d / "__0_0.distcp", (5 << 20) - 10, b"\0" * 10), "__0_0.distcp: checksum differs"),
    (lambda d: overwrite(d / "trainer.pt", 3, b"\0"), "trainer.pt: checksum differs"),
    (lambda d: (d / MANIFEST_FILE).write_text("{"), "manifest.json is unreadable"),
])
def test_a_damaged_newest_checkpoint_is_skipped_naming_the_file(tmp_path, damage, reason):
    checkpoints = checkpoints_dir(tmp_path, "300", [100, 200, 300])
    for iteration in (200, 300):
        with_manifest(checkpoints / checkpoint_dir_name(iteration),
                      {"__0_0.distcp": 5 << 20, "trainer.pt": 700, "rng_rank1.pt": 300})
    assert checkpoint_problem(checkpoints / "iter_0000300") is None
    damage(checkpoints / "iter_0000300")
    state = resume_state(checkpoints, None)
    assert (state.iteration, state.path) == (200, str(checkpoints / "iter_0000200"))
    assert len(state.skipped) == 1 and state.skipped[0].startswith(f"{checkpoints / 'iter_0000300'}: {reason}")


def overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_unreadable_tracker(tmp_path):
    checkpoints = checkpoints_dir(tmp_path, "release", [100])
    with pytest.raises(ResumeError, match="'release'"):
        resume_state(checkpoints, None)


def test_without_tracker_start_from_the_initial_checkpoint(tmp_path):
    checkpoints = checkpoints_dir(tmp_path, None, [100])  # directories alone are not a finished save
    state = resume_state(checkpoints, "/models/Qwen3-8B")
    assert (state.decision, state.iteration, state.path) == ("from_checkpoint", 0, "/models/Qwen3-8B")


def test_nothing_means_from_scratch(tmp_path):
    state = resume_state(tmp_path / "does-not-exist", None)
    assert (state.decision, state.iteration, state.path) == ("from_scratch", 0, None)
    assert resume_state(tmp_path / "does-not-exist", "").decision == "from_scratch"


def test_read_tracker(tmp_path):
    assert read_tracker(tmp_path) is None
    (tmp_path / TRACKER_FILE).write_text("  42 \n")
    assert read_tracker(tmp_path) == 42


# ----------------------------------------------------------------- env log

def test_env_log_redacts_secrets_and_lists_everything_else():
    env = {"HF_TOKEN": "hf_SECRETVALUE123", "MY_SECRET": "s3cr3t-value", "DB_PASSWORD": "pa55word",
           "MODEL": "tiny-qwen3", "TP_SIZE": "2", "A_FIRST": "x"}
    text = env_log_text("qad", "/confs/q.conf", env, jobid="4242", datetime=STAMP)
    for secret in ("hf_SECRETVALUE123", "s3cr3t-value", "pa55word"):
        assert secret not in text
    lines = text.splitlines()
    assert "HF_TOKEN=<redacted>" in lines and "MY_SECRET=<redacted>" in lines and "DB_PASSWORD=<redacted>" in lines
    assert "MODEL=tiny-qwen3" in lines and "TP_SIZE=2" in lines
    header = [line for line in lines if line.startswith("#")]
    body = [line for line in lines if not line.startswith("#")]
    assert body == sorted(body) and len(body) == len(env)
    joined = "\n".join(header)
    assert "qad" in joined and "4242" in joined and STAMP in joined and "/confs/q.conf" in joined
    assert socket.gethostname() in joined


def test_env_log_keeps_values_with_special_characters():
    text = env_log_text("pretrain", "c", {"NOTE": "a $b ${c} = d"}, jobid="nojob", datetime=STAMP)
    assert "NOTE=a $b ${c} = d\n" in text
