"""python -m pytest tests/unit/test_distill_kd_config.py  (KD_CFG_PATH settings, errors, vocabulary rule)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from train.config import JobConfig
from train.distill.kd_config import KDConfigError, check_distill_config, load_kd_config, resolve_vocab

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path, text: str) -> str:
    path = tmp_path / "kd.yaml"
    path.write_text(text)
    return str(path)


def test_settings_and_megatron_aliases(tmp_path):
    assert load_kd_config(write(tmp_path, "temperature: 2\nlm_loss_weight: 0.5\nchunk_size: 256\n")) == \
        {"temperature": 2, "lm_loss_weight": 0.5, "chunk_size": 256}
    megatron = "logit_layers: [output_layer, output_layer]\nintermediate_layer_pairs: []\n" \
               "skip_lm_loss: true\nkd_loss_scale: 1.0\nlogit_kl_temperature: 1.5\n"
    assert load_kd_config(write(tmp_path, megatron)) == {"temperature": 1.5, "lm_loss_weight": 0.0}
    assert load_kd_config(write(tmp_path, "")) == {}


@pytest.mark.parametrize("text,message", [
    ("temprature: 2\n", "unknown key 'temprature'"),
    ("temperature: 0\n", "temperature: must be > 0"),
    ("temperature: hot\n", "temperature: expected a number"),
    ("lm_loss_weight: -1\n", "lm_loss_weight: must be >= 0"),
    ("chunk_size: 1.5\n", "chunk_size: expected an integer"),
    ("chunk_size: 0\n", "chunk_size: must be >= 1"),
    ("skip_lm_loss: maybe\n", "skip_lm_loss: expected true or false"),
    ("kd_loss_scale: 2\n", "kd_loss_scale: only 1.0"),
    ("intermediate_layer_pairs: [[a, b]]\n", "intermediate_layer_pairs"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("temperature: [\n", "not valid YAML"),
])
def test_bad_file_names_file_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(KDConfigError, match=message) as error:
        load_kd_config(path)
    assert path in str(error.value)


def test_vocab_rule():
    assert resolve_vocab(100, 100, None) is None
    assert resolve_vocab(128, 120, 110) == 110  # padding only: compare the 110 real tokens
    with pytest.raises(KDConfigError, match="student has 128 logits, teacher 120"):
        resolve_vocab(128, 120, None)
    with pytest.raises(KDConfigError, match="student has 128 logits, teacher 120, tokenizer 125"):
        resolve_vocab(128, 120, 125)


def job_cfg(tmp_path, student_vocab, teacher_vocab, kd_text=None):
    cfg = OmegaConf.structured(JobConfig(job="qad"))
    for name, vocab in (("student", student_vocab), ("teacher", teacher_vocab)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"vocab_size": vocab}))
    cfg.model.hf_checkpoint, cfg.distill.teacher_checkpoint = str(tmp_path / "student"), str(tmp_path / "teacher")
    if kd_text is not None:
        cfg.distill.kd_config_path = write(tmp_path, kd_text)
    return cfg


def test_check_distill_config_merges_and_checks(tmp_path):
    cfg = job_cfg(tmp_path, 128, 120, "temperature: 3.0\ntokenizer_vocab_size: 100\n")
    assert check_distill_config(cfg) == 100
    assert cfg.distill.temperature == 3.0 and cfg.distill.tokenizer_vocab_size == 100


@pytest.mark.slow  # two python -m startups: ~40 s on 2 busy cores
def test_qad_refuses_bad_kd_config_and_vocab_at_start(tmp_path):
    """python -m train.qad: one error line, exit 2, before any model, process group or run dir."""
    cfg = job_cfg(tmp_path, 128, 120, "temperature: -1\n")
    base = [sys.executable, "-m", "train.qad", "model.name=x", f"model.hf_checkpoint={cfg.model.hf_checkpoint}",
            f"distill.teacher_checkpoint={cfg.distill.teacher_checkpoint}", f"checkpoint.root={tmp_path / 'runs'}"]
    bad_file = subprocess.run(base + [f"distill.kd_config_path={cfg.distill.kd_config_path}"], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert bad_file.returncode == 2, bad_file.stderr[-2000:]
    assert f"error: KD_CFG_PATH {cfg.distill.kd_config_path}: temperature: must be > 0" in bad_file.stderr
    mismatch = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert mismatch.returncode == 2 and "student has 128 logits, teacher 120" in mismatch.stderr, mismatch.stderr
    assert not (tmp_path / "runs").exists()


def test_launch_plan_refuses_a_bad_kd_file(tmp_path):
    """The plan (launchers, sbatch wrappers, train.submit) checks the file before a job starts."""
    from train.launch.plan import PlanError, plan_from_conf

    (tmp_path / "ckpt").mkdir()
    kd = write(tmp_path, "temprature: 2\n")
    conf = tmp_path / "qad.conf"
    conf.write_text(f"export STUDENT_MODEL=tiny-qwen3\nexport TEACHER_MODEL=tiny-qwen3\nexport STUDENT_CKPT={tmp_path}/ckpt\n"
                    f"export TEACHER_CKPT={tmp_path}/ckpt\nexport TP_SIZE=1\nexport MBS=2\nexport NUM_GPUS=2\n"
                    f"export DATASET_NAME=synthetic\nexport TRAIN_ITERS=5\nexport KD_CFG_PATH={kd}\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "QAD_CHECKPOINT_ROOT": str(tmp_path / "runs")}
    with pytest.raises(PlanError) as error:
        plan_from_conf("qad", str(conf), [], env)
    assert f"KD_CFG_PATH {kd}: unknown key 'temprature'" in str(error.value)
