"""python -m pytest tests/unit/test_launch_conf.py  (the .conf contract: train/launch/conf.py)"""

import os
from pathlib import Path

import pytest

from train.launch import conf as conf_lib
from train.launch.conf import (
    CONF_DIR,
    CONF_VARIABLES,
    REDACTED,
    ConfError,
    JOBS,
    config_overrides,
    is_secret,
    job_of_conf,
    job_values,
    load_conf,
    redact,
    resolve_conf_path,
    source_conf,
    unknown_variable_warnings,
)

# docs/launching.md, "The .conf contract": required for QAD.
QAD_REQUIRED = ["STUDENT_MODEL", "TEACHER_MODEL", "STUDENT_CKPT", "TEACHER_CKPT", "TP_SIZE", "MBS"]
QAD_OK = "".join(f"export {name}={value}\n" for name, value in [
    ("STUDENT_MODEL", "Qwen3-8B"), ("TEACHER_MODEL", "Qwen3-32B"), ("STUDENT_CKPT", "/m/s"),
    ("TEACHER_CKPT", "/m/t"), ("TP_SIZE", "1"), ("MBS", "4")])


@pytest.fixture
def base_env(tmp_path):
    """A hermetic caller environment: nothing from the outer shell or a SLURM job leaks in."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
            "QAD_CHECKPOINT_ROOT": str(tmp_path / "runs"), "DATACACHE_DIR": str(tmp_path / "data")}


def write_conf(directory: Path, text: str, name: str = "test.conf") -> Path:
    path = directory / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------- --config resolution

@pytest.mark.parametrize("config", ["tiny-qwen3", "tiny-qwen3.conf"])
def test_bare_name_finds_the_conf_in_conf_d(config):
    assert resolve_conf_path(config) == (CONF_DIR / "tiny-qwen3.conf").resolve()


def test_absolute_and_relative_paths_are_taken_as_given(tmp_path, monkeypatch):
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\n", "mine.conf")
    assert resolve_conf_path(str(conf)) == conf.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_conf_path("mine.conf") == conf.resolve()
    assert resolve_conf_path("./mine.conf") == conf.resolve()


def test_path_relative_to_the_checkout_works_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as in `cd /scratch && sbatch /repo/slurm/qad.sh --config conf.d/qwen3-8b.conf`
    assert resolve_conf_path("conf.d/qwen3-8b.conf") == (CONF_DIR / "qwen3-8b.conf").resolve()


def test_a_path_wins_over_a_conf_d_name(tmp_path, monkeypatch):
    local = write_conf(tmp_path, "export MODEL=tiny-llama2\n", "tiny-qwen3.conf")
    monkeypatch.chdir(tmp_path)
    assert resolve_conf_path("tiny-qwen3.conf") == local.resolve()
    assert resolve_conf_path("tiny-qwen3") == (CONF_DIR / "tiny-qwen3.conf").resolve()


def test_unknown_config_lists_every_known_conf():
    with pytest.raises(ConfError) as error:
        resolve_conf_path("no-such-conf-xyz")
    message = str(error.value)
    assert "no-such-conf-xyz" in message
    assert "tiny-qwen3" in message and "qwen3-8b" in message and "qwen3-30b-a3b-thinking-2507-moe" in message
    shipped = sorted(p.name[:-len(".conf")] for p in CONF_DIR.iterdir() if p.name.endswith(".conf"))
    assert len(shipped) >= 5
    assert all(name in message for name in shipped)


def test_a_directory_is_not_a_conf(tmp_path):
    with pytest.raises(ConfError, match="no such file"):
        resolve_conf_path(str(tmp_path))


# ----------------------------------------------------------------- sourcing

def test_unparsable_conf_names_the_file_and_line(tmp_path, base_env):
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nexport MBS=2\nif then\nexport LR=1\n")
    with pytest.raises(ConfError) as error:
        source_conf(conf, base_env)
    message = str(error.value)
    assert str(conf) in message and "bash cannot parse" in message
    assert "line 3" in message


def test_unterminated_quote_is_a_parse_error(tmp_path, base_env):
    conf = write_conf(tmp_path, 'export MODEL=tiny-qwen3\nexport DATASET_NAME="open\n')
    with pytest.raises(ConfError, match="bash cannot parse"):
        source_conf(conf, base_env)


def test_failing_last_command_fails_the_source(tmp_path, base_env):
    # `source` returns the status of the conf's last command: the conf "failed".
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nfalse\n")
    with pytest.raises(ConfError) as error:
        source_conf(conf, base_env)
    assert str(conf) in str(error.value) and "sourcing it failed (exit 1)" in str(error.value)


def test_missing_command_reports_bash_message_with_line(tmp_path, base_env):
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nno_such_command_xyz --flag\n")
    with pytest.raises(ConfError) as error:
        source_conf(conf, base_env)
    message = str(error.value)
    assert "(exit 127)" in message and "no_such_command_xyz" in message and "line 2" in message


def test_exit_status_of_an_explicit_exit_is_reported(tmp_path, base_env):
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nexit 3\n")
    with pytest.raises(ConfError, match=r"sourcing it failed \(exit 3\)"):
        source_conf(conf, base_env)


def test_failure_in_the_middle_stops_the_conf_and_names_the_line(tmp_path, base_env):
    # errexit while sourcing, as launchers/lib.sh sources under set -e: a failing command
    # is an error naming its line, not silently skipped.
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nfalse\nexport MBS=3\n")
    with pytest.raises(ConfError, match=r"line 2: a command failed with exit 1"):
        source_conf(conf, base_env)


def test_conf_output_does_not_leak_into_the_variables(tmp_path, base_env):
    conf = write_conf(tmp_path, 'echo "FAKE_VAR=1"\nprintf "X=2\\0Y=3\\0"\nexport MODEL=tiny-qwen3\n')
    assert source_conf(conf, base_env) == {"MODEL": "tiny-qwen3"}


def test_returns_only_what_the_conf_set_or_changed(tmp_path, base_env):
    base_env.update(SAME="kept", CHANGED="old", UNTOUCHED="x")
    conf = write_conf(tmp_path, "export SAME=kept\nexport CHANGED=new\nPLAIN=1\nexport FRESH=yes\n")
    # set -a: plain assignments are exported too, as in the users' `set -a; source` scripts
    assert source_conf(conf, base_env) == {"CHANGED": "new", "PLAIN": "1", "FRESH": "yes"}


def test_empty_conf_sets_nothing(tmp_path, base_env):
    assert source_conf(write_conf(tmp_path, "# nothing\n"), base_env) == {}


def test_values_keep_spaces_equals_signs_and_newlines(tmp_path, base_env):
    conf = write_conf(tmp_path, "export A='x=y z'\nexport B=\"two\nlines\"\nexport C=\n")
    assert source_conf(conf, base_env) == {"A": "x=y z", "B": "two\nlines", "C": ""}


def test_conf_sees_the_callers_environment(tmp_path, base_env):
    base_env["MODELS_ROOT"] = "/cluster/models"
    conf = write_conf(tmp_path, 'export STUDENT_CKPT=$MODELS_ROOT/Qwen3-8B\n'
                                'export TRAIN_ITERS=${TRAIN_ITERS:-20}\n')
    assert source_conf(conf, base_env) == {"STUDENT_CKPT": "/cluster/models/Qwen3-8B", "TRAIN_ITERS": "20"}
    base_env["TRAIN_ITERS"] = "7"
    assert source_conf(conf, base_env) == {"STUDENT_CKPT": "/cluster/models/Qwen3-8B"}


def test_unset_in_the_conf_removes_the_callers_value(tmp_path, base_env):
    base_env["TRAIN_SAMPLES"] = "1000"
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nunset TRAIN_SAMPLES\n")
    _, env, values, _ = load_conf(str(conf), "pretrain", base_env)
    assert "TRAIN_SAMPLES" not in values and "TRAIN_SAMPLES" not in env


# ----------------------------------------------------------------- typo warnings

def test_typo_warns_did_you_mean(tmp_path, base_env):
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\nexport TP_SZE=2\n")
    path, _, values, warnings = load_conf(str(conf), "pretrain", base_env)
    assert warnings == [f"{path}: TP_SZE: did you mean TP_SIZE?"]
    assert values["TP_SIZE"] == 1  # the typo did not set TP_SIZE


@pytest.mark.parametrize("typo,meant", [("NUM_GPU", "NUM_GPUS"), ("SEQ_LEN", "SEQ_LENGTH"),
                                        ("LOG_PARAM_NORM", "LOG_PARAMS_NORM"), ("STUDENT_CKTP", "STUDENT_CKPT")])
def test_other_typos_name_the_right_variable(typo, meant):
    assert unknown_variable_warnings({typo: "1"}, Path("x.conf")) == [f"x.conf: {typo}: did you mean {meant}?"]


def test_unrelated_and_known_names_are_silent():
    conf_vars = {name: "1" for name in ["NCCL_DEBUG", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTHONPATH",
                                         "HF_HOME", "NCCL_SOCKET_IFNAME", "TP_SIZE", "MODEL", "HF_TOKEN"]}
    assert unknown_variable_warnings(conf_vars, Path("x.conf")) == []


def test_only_the_confs_own_variables_are_checked(tmp_path, base_env):
    base_env["TP_SZE"] = "2"  # a typo in the caller's shell is not the conf's
    conf = write_conf(tmp_path, "export MODEL=tiny-qwen3\n")
    assert load_conf(str(conf), "pretrain", base_env)[3] == []


# ----------------------------------------------------------------- required variables

def test_design_lists_the_qad_required_variables():
    assert sorted(n for n, v in CONF_VARIABLES.items() if "qad" in v.required_for) == sorted(QAD_REQUIRED)


def test_qad_reports_every_missing_variable_and_its_meaning(tmp_path, base_env):
    conf = write_conf(tmp_path, "export STUDENT_MODEL=Qwen3-8B\nexport TP_SIZE=1\n")
    with pytest.raises(ConfError) as error:
        load_conf(str(conf), "qad", base_env)
    message = str(error.value)
    assert str(conf) in message and "qad" in message
    for name in ["TEACHER_MODEL", "STUDENT_CKPT", "TEACHER_CKPT", "MBS"]:
        assert f"{name}: {CONF_VARIABLES[name].help}" in message
    assert "STUDENT_MODEL" not in message and "TP_SIZE" not in message


def test_empty_value_counts_as_missing(tmp_path, base_env):
    conf = write_conf(tmp_path, QAD_OK + "export MBS=\n")
    with pytest.raises(ConfError, match="MBS"):
        load_conf(str(conf), "qad", base_env)


def test_complete_qad_conf_loads(tmp_path, base_env):
    path, env, values, warnings = load_conf(str(write_conf(tmp_path, QAD_OK)), "qad", base_env)
    assert path == (tmp_path / "test.conf").resolve()
    assert values["STUDENT_MODEL"] == "Qwen3-8B" and values["MBS"] == 4 and values["TP_SIZE"] == 1
    assert env["STUDENT_CKPT"] == "/m/s" and env["HOME"] == base_env["HOME"]
    assert warnings == []


def test_required_variables_may_come_from_the_callers_environment(tmp_path, base_env):
    base_env.update(STUDENT_CKPT="/env/s", TEACHER_CKPT="/env/t")
    conf = write_conf(tmp_path, "".join(line + "\n" for line in QAD_OK.splitlines() if "CKPT" not in line))
    values = load_conf(str(conf), "qad", base_env)[2]
    assert values["STUDENT_CKPT"] == "/env/s" and values["TEACHER_CKPT"] == "/env/t"


@pytest.mark.parametrize("job", ["pretrain", "finetune"])
def test_pretrain_and_finetune_need_model(job, tmp_path, base_env):
    conf = write_conf(tmp_path, "export SEQ_LENGTH=64\n")
    with pytest.raises(ConfError) as error:
        load_conf(str(conf), job, base_env)
    assert "MODEL: " + CONF_VARIABLES["MODEL"].help in str(error.value)
    assert "STUDENT_MODEL" not in str(error.value)  # qad's variables are not pretraining's


def test_qad_does_not_need_model(tmp_path, base_env):
    values = load_conf(str(write_conf(tmp_path, QAD_OK)), "qad", base_env)[2]
    assert "MODEL" not in values


def test_unknown_job(tmp_path):
    with pytest.raises(ConfError, match="unknown job 'sft'"):
        load_conf("tiny-qwen3", "sft", {})


# ----------------------------------------------------------------- types

@pytest.mark.parametrize("name,value,what", [
    ("TP_SIZE", "two", "is not an integer"),
    ("MBS", "1.5", "is not an integer"),
    ("NUM_GPUS", "8x", "is not an integer"),
    ("LR", "fast", "is not a number"),
    ("LR", "1e-6.0", "is not a number"),
])
def test_bad_numbers_name_file_and_variable(name, value, what, tmp_path, base_env):
    conf = write_conf(tmp_path, QAD_OK + f"export {name}={value}\n")
    with pytest.raises(ConfError) as error:
        load_conf(str(conf), "qad", base_env)
    message = str(error.value)
    assert str(conf) in message and f"{name}={value!r}" in message and what in message


def test_numbers_are_typed(tmp_path, base_env):
    conf = write_conf(tmp_path, QAD_OK + "export LR=3e-4\nexport PP_SIZE=2\nexport TIME_BUDGET_S=90\n")
    values = load_conf(str(conf), "qad", base_env)[2]
    assert values["LR"] == pytest.approx(3e-4) and isinstance(values["LR"], float)
    assert values["PP_SIZE"] == 2 and isinstance(values["PP_SIZE"], int)
    assert values["TIME_BUDGET_S"] == 90.0


@pytest.mark.parametrize("raw,expected", [("1", True), ("true", True), ("TRUE", True), (" Yes ", True),
                                          ("on", True), ("0", False), ("false", False), ("No", False),
                                          ("off", False)])
def test_log_params_norm_is_a_bool(raw, expected, tmp_path, base_env):
    conf = write_conf(tmp_path, QAD_OK + f"export LOG_PARAMS_NORM='{raw}'\n")
    assert load_conf(str(conf), "qad", base_env)[2]["LOG_PARAMS_NORM"] is expected


def test_log_params_norm_rejects_other_words(tmp_path, base_env):
    conf = write_conf(tmp_path, QAD_OK + "export LOG_PARAMS_NORM=maybe\n")
    with pytest.raises(ConfError) as error:
        load_conf(str(conf), "qad", base_env)
    assert str(conf) in str(error.value) and "LOG_PARAMS_NORM='maybe'" in str(error.value)


# ----------------------------------------------------------------- precedence and defaults

def test_conf_wins_over_env_and_env_over_defaults(tmp_path, base_env):
    base_env.update(MBS="16", NUM_GPUS="4", PP_SIZE="2")
    values = load_conf(str(write_conf(tmp_path, QAD_OK)), "qad", base_env)[2]
    assert values["MBS"] == 4  # the conf's export MBS=4
    assert values["NUM_GPUS"] == 4  # not in the conf: the caller's environment
    assert values["PP_SIZE"] == 2


def test_defaults_when_neither_conf_nor_env_sets_a_variable(tmp_path, base_env):
    values = load_conf(str(write_conf(tmp_path, QAD_OK)), "qad", base_env)[2]
    assert values["NUM_GPUS"] == 8
    assert values["LR"] == pytest.approx(1e-6)
    assert values["PP_SIZE"] == 1 and values["EP_SIZE"] == 1
    assert values["DATASET_NAME"] == "openscience"
    assert "TRAIN_SAMPLES" not in values and "BLEND_PATH" not in values


def test_job_values_treats_empty_as_unset():
    values = job_values("pretrain", {"MODEL": "tiny-qwen3", "NUM_GPUS": "", "LR": "1e-4", "TP_SIZE": "2"},
                        Path("p.conf"))
    assert values["NUM_GPUS"] == 8 and values["LR"] == pytest.approx(1e-4) and values["TP_SIZE"] == 2
    with pytest.raises(ConfError, match=r"^p\.conf: required for a qad job"):
        job_values("qad", {"MODEL": "tiny-qwen3"}, Path("p.conf"))


def test_lr_default_is_for_qad_only(tmp_path, base_env):
    values = load_conf(str(write_conf(tmp_path, "export MODEL=tiny-qwen3\n")), "pretrain", base_env)[2]
    assert "LR" not in values  # the pretrain config's own LR applies
    assert values["NUM_GPUS"] == 8


def test_lr_from_env_beats_the_qad_default(tmp_path, base_env):
    base_env["LR"] = "2e-5"
    assert load_conf(str(write_conf(tmp_path, QAD_OK)), "qad", base_env)[2]["LR"] == pytest.approx(2e-5)


def test_shipped_conf_uses_env_for_its_fallbacks(base_env):
    values = load_conf("tiny-qwen3", "pretrain", base_env)[2]
    assert values["TRAIN_ITERS"] == 20 and values["NUM_GPUS"] == 2 and values["LR"] == pytest.approx(1e-3)
    assert values["QAD_CHECKPOINT_ROOT"] == base_env["QAD_CHECKPOINT_ROOT"]
    base_env.update(TRAIN_ITERS="7", LR="5")
    values = load_conf("tiny-qwen3", "pretrain", base_env)[2]
    assert values["TRAIN_ITERS"] == 7  # ${TRAIN_ITERS:-20}
    assert values["LR"] == pytest.approx(1e-3)  # hard-coded in the conf: it wins


def test_each_job_reads_only_its_variables(tmp_path, base_env):
    base_env.update(STUDENT_MODEL="s", LORA_RANK="4", BASE_CKPT="/b")
    pretrain = load_conf(str(write_conf(tmp_path, "export MODEL=tiny-qwen3\n")), "pretrain", base_env)[2]
    assert not {"STUDENT_MODEL", "LORA_RANK", "BASE_CKPT"} & set(pretrain)
    finetune = load_conf(str(write_conf(tmp_path, "export MODEL=tiny-qwen3\n")), "finetune", base_env)[2]
    assert finetune["LORA_RANK"] == 4 and finetune["BASE_CKPT"] == "/b" and "STUDENT_MODEL" not in finetune


# ----------------------------------------------------------------- config keys

def test_dataset_name_picks_the_data_source():
    assert config_overrides("pretrain", {"DATASET_NAME": "synthetic"})["data.source"] == "synthetic"
    other = config_overrides("pretrain", {"DATASET_NAME": "openscience"})
    assert other["data.source"] == "blend" and other["data.dataset_name"] == "openscience"
    assert "data.source" not in config_overrides("pretrain", {"MBS": 2})


def test_qad_variables_map_to_their_keys(tmp_path, base_env):
    conf = write_conf(tmp_path, QAD_OK + "export MODELS_ROOT=/m\nexport HF_TOKEN=hf_abc\n")
    values = load_conf(str(conf), "qad", base_env)[2]
    overrides = config_overrides("qad", values)
    assert overrides["model.name"] == "Qwen3-8B"
    assert overrides["distill.teacher_model"] == "Qwen3-32B"
    assert overrides["model.hf_checkpoint"] == "/m/s"
    assert overrides["distill.teacher_checkpoint"] == "/m/t"
    assert overrides["training.micro_batch_size"] == 4
    assert overrides["optim.lr"] == pytest.approx(1e-6)
    assert overrides["checkpoint.root"] == base_env["QAD_CHECKPOINT_ROOT"]
    assert overrides["data.datacache_dir"] == base_env["DATACACHE_DIR"]
    # launcher-only variables and secrets never reach the config
    assert values["HF_TOKEN"] == "hf_abc" and values["MODELS_ROOT"] == "/m" and values["NUM_GPUS"] == 8
    assert "hf_abc" not in overrides.values() and "/m" not in overrides.values()
    assert 8 not in overrides.values()


def test_finetune_base_checkpoint_and_lora_keys():
    overrides = config_overrides("finetune", {"MODEL": "tiny-qwen3", "BASE_CKPT": "/b", "LORA_RANK": 8})
    assert overrides == {"model.name": "tiny-qwen3", "model.hf_checkpoint": "/b", "lora.rank": 8}


def test_every_config_key_exists_in_the_schema():
    from omegaconf import OmegaConf

    from train.config import JobConfig

    schema = OmegaConf.structured(JobConfig)
    for var in CONF_VARIABLES.values():
        assert var.kind in ("str", "int", "float", "bool", "path", "dir"), var.name
        assert set(var.required_for) <= set(var.jobs), var.name
        if var.key is not None:
            parent, _, leaf = var.key.rpartition(".")
            assert leaf in OmegaConf.select(schema, parent).keys(), f"{var.name} -> {var.key}"


@pytest.mark.parametrize("conf", sorted(p.name for p in CONF_DIR.glob("*.conf")))
def test_every_shipped_conf_names_its_job_and_loads_for_it_only(conf, base_env):
    text = (CONF_DIR / conf).read_text()
    expected = "qad" if "STUDENT_MODEL" in text else "finetune" if "LORA_RANK" in text else "pretrain"
    job = job_of_conf(conf, base_env)
    assert job == expected
    base_env["MODELS_ROOT"] = "/models"
    path, _, values, warnings = load_conf(conf, job, base_env)
    assert path == CONF_DIR / conf and warnings == []
    assert values["NUM_GPUS"] >= 1 and values["TP_SIZE"] >= 1
    for other in set(JOBS) - {job}:
        with pytest.raises(ConfError, match=f"JOB={job}: this conf is for a {job} job, not {other}"):
            load_conf(conf, other, base_env)


# ----------------------------------------------------------------- JOB: the job a conf is for

def test_a_conf_of_another_job_is_refused_naming_the_conf_and_both_jobs(tmp_path, base_env):
    path = write_conf(tmp_path, "export JOB=pretrain\nexport MODEL=tiny-qwen3\n")
    with pytest.raises(ConfError) as error:
        load_conf(str(path), "finetune", base_env)
    assert str(error.value).startswith(f"{path}: JOB=pretrain: this conf is for a pretrain job, not finetune")
    assert load_conf(str(path), "pretrain", base_env)[2]["MODEL"] == "tiny-qwen3"


def test_job_must_be_a_known_job(tmp_path, base_env):
    path = write_conf(tmp_path, "export JOB=sft\nexport MODEL=tiny-qwen3\n")
    for call in (lambda: load_conf(str(path), "pretrain", base_env), lambda: job_of_conf(str(path), base_env)):
        with pytest.raises(ConfError, match=f"{path}: JOB='sft' is not one of qad, pretrain, finetune"):
            call()


def test_job_is_the_confs_own_never_the_callers(tmp_path, base_env):
    """A JOB exported in the caller's shell neither refuses a conf without JOB nor names its job."""
    path = write_conf(tmp_path, "export MODEL=tiny-qwen3\n")
    base_env["JOB"] = "qad"
    assert load_conf(str(path), "pretrain", base_env)[2]["MODEL"] == "tiny-qwen3"
    with pytest.raises(ConfError, match=f"{path}: no JOB: add `export JOB=pretrain|qad|finetune`"):
        job_of_conf(str(path), base_env)


# ----------------------------------------------------------------- secrets

@pytest.mark.parametrize("name", ["HF_TOKEN", "MY_SECRET", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD",
                                  "GCP_CREDENTIALS", "WANDB_API_KEY", "hf_token", "GITHUB_TOKEN"])
def test_secret_names(name):
    assert is_secret(name)


@pytest.mark.parametrize("name", ["MODEL", "TP_SIZE", "STUDENT_CKPT", "DATASET_NAME", "PATH", "KEEP_LAST",
                                  "QAD_CHECKPOINT_ROOT", "MASTER_ADDR"])
def test_non_secret_names(name):
    assert not is_secret(name)


def test_redact_hides_values_and_keeps_names():
    env = {"HF_TOKEN": "hf_realtoken", "DB_PASSWORD": "pw", "MODEL": "tiny-qwen3", "GCP_CREDENTIALS": "{}"}
    redacted = redact(env)
    assert redacted == {"HF_TOKEN": REDACTED, "DB_PASSWORD": REDACTED, "MODEL": "tiny-qwen3",
                        "GCP_CREDENTIALS": REDACTED}
    assert env["HF_TOKEN"] == "hf_realtoken"  # the input is not modified
    assert "hf_realtoken" not in repr(redacted)


def test_describe_variables_has_one_row_per_variable():
    table = conf_lib.describe_variables().splitlines()
    assert len(table) == 2 + len(CONF_VARIABLES)
    assert any(row.startswith("| `STUDENT_CKPT` | qad | qad |") for row in table)


def test_docs_conf_table_is_the_generated_one():
    """docs/launching.md holds exactly the table CONF_VARIABLES generates (every variable)."""
    text = conf_lib.DOCS_PAGE.read_text()
    assert text.count(conf_lib.TABLE_START) == 1 and text.count(conf_lib.TABLE_END) == 1, \
        f"{conf_lib.DOCS_PAGE}: one {conf_lib.TABLE_START} ... {conf_lib.TABLE_END} block expected"
    assert text == conf_lib.docs_with_table(text), (
        "the .conf table in docs/launching.md differs from CONF_VARIABLES; regenerate it with "
        "`python -m train.launch.conf --update-docs`")
    table = text.split(conf_lib.TABLE_START)[1].split(conf_lib.TABLE_END)[0]
    assert all(f"| `{name}` |" in table for name in CONF_VARIABLES)


def test_every_shipped_conf_states_its_precision():
    """GPU confs train in bf16 (autocast, fp32 master weights); the tiny CPU ones in fp32."""
    for path in sorted(CONF_DIR.glob("*.conf")):
        lines = [line for line in path.read_text().splitlines() if line.startswith("export PRECISION=")]
        wanted = "fp32" if path.name.startswith("tiny-") else "bf16"
        assert len(lines) == 1 and lines[0].removesuffix("}").endswith(wanted), \
            f"{path.name}: {lines or 'no PRECISION'} (wanted {wanted})"
