"""python -m pytest tests/integration/test_bad_inputs.py  (real launchers; bad inputs stop at plan time with one
`error:` line, exit 2 and no run directory; a failure only a worker can see ends with its `error:` line, exit 2)"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.synthetic_data import write_random_documents
from tests.unit.hf_fixtures import save_tiny_tokenizer
from train.models import random_hf

REPO = Path(__file__).resolve().parents[2]
QAD = ["--config", "tiny-qwen3-qad", "--", "DATASET_NAME=good", "TRAIN_ITERS=2"]
PRETRAIN = ["--config", "tiny-qwen3", "--", "DATASET_NAME=good", "TRAIN_ITERS=2"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A real tiny-qwen3 HF checkpoint and a datablend of one .bin/.idx pair, copied into each test."""
    root = tmp_path_factory.mktemp("assets")
    assert random_hf.main(["tiny-qwen3", str(root / "models" / "tiny-qwen3")]) == 0  # in this process: no start-up
    (root / "data").mkdir()
    write_random_documents(str(root / "data" / "a_text_document"), 60, 50, 1000, 0, 1)
    (root / "data" / "datablend_good.json").write_text(json.dumps({"train": [1.0, "a_text_document"]}))
    return root


@pytest.fixture
def work(assets, tmp_path) -> Path:
    shutil.copytree(assets, tmp_path, dirs_exist_ok=True)
    return tmp_path


def launch(job: str, args: list[str], work: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                     "HF_TOKEN", "TRAIN_", "RUN_LOCK"))}
    env.update(QAD_CHECKPOINT_ROOT=str(work / "runs"), MODELS_ROOT=str(work / "models"),
               DATACACHE_DIR=str(work / "data"), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(REPO / "launchers" / f"{job}.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def truncate(path: Path, size: int) -> None:
    with path.open("r+b") as file:
        file.truncate(size)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


def edit_config(work: Path, **changes) -> None:
    path = work / "models" / "tiny-qwen3" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def validate_mode(work: Path, chat_template: str | None) -> list[str]:
    tokenizer = save_tiny_tokenizer(work / "tokenizer")  # a tokenizer with no chat template
    if chat_template:
        config = tokenizer / "tokenizer_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": chat_template}))
    (work / "val.jsonl").write_text('{"prompt": "a?", "label": "yes", "category": "x"}\n')
    return ["--config", "tiny-qwen3-lora", "--", "DATASET_NAME=good", "MODE=validate", f"VAL_SET={work / 'val.jsonl'}",
            f"validate.tokenizer={tokenizer}"]


# case -> (job, break the inputs in the work directory (returns the launcher's arguments, or None: the
# job's default), fragments the one error line names)
CASES = {
    "bin_truncated": ("pretrain", lambda w: truncate(w / "data/a_text_document.bin", 3000),
                      ["BLEND_PATH", "a_text_document.bin", "size 3000 bytes does not match its index"]),
    "idx_dtype_code": ("pretrain", lambda w: overwrite(w / "data/a_text_document.idx", 17, b"\x63"),
                       ["a_text_document.idx", "unknown dtype code 99"]),
    "no_config_json": ("qad", lambda w: (w / "models/tiny-qwen3/config.json").unlink(),
                       ["STUDENT_CKPT", "TEACHER_CKPT", "has no config.json"]),
    "unsupported_model_type": ("qad", lambda w: edit_config(w, model_type="bert"),
                               ["config.json", "model_type 'bert' is not supported"]),
    "seq_length_above_hf_maximum": ("qad", lambda w: QAD + ["SEQ_LENGTH=1024"],
                                    ["SEQ_LENGTH=1024", "maximum 512", "max_position_embeddings"]),
    "seq_length_above_registry_maximum": ("pretrain", lambda w: PRETRAIN + ["SEQ_LENGTH=100000"],
                                          ["SEQ_LENGTH=100000", "maximum 512", "MODEL"]),
    "negative_lr": ("pretrain", lambda w: PRETRAIN + ["LR=-1e-3"], ["LR=-0.001", "optim.lr"]),
    "beta2_of_one": ("pretrain", lambda w: PRETRAIN + ["optim.beta2=1.0"], ["optim.beta2=1.0", "[0, 1)"]),
    "safetensors_truncated": ("qad", lambda w: truncate(w / "models/tiny-qwen3/model.safetensors", 100_000),
                              ["model.safetensors", "100000 bytes", "truncated"]),
    "safetensors_bad_header": ("qad", lambda w: overwrite(w / "models/tiny-qwen3/model.safetensors", 8, b"garbage!"),
                               ["model.safetensors", "not a safetensors file"]),
    "validate_without_chat_template": ("finetune", lambda w: validate_mode(w, None),
                                       ["validate.tokenizer", "no chat template"]),
    "validate_without_a_trained_run": ("finetune", lambda w: validate_mode(w, "{{ messages[0]['content'] }}"),
                                       ["mode=validate: no checkpoint in", "MODE=train"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_stops_at_plan_time_with_one_error_line(case, work):
    job, corrupt, expected = CASES[case]
    args = corrupt(work) or {"pretrain": PRETRAIN, "qad": QAD}[job]
    result = launch(job, args, work)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in expected:
        assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.stderr
    assert not (work / "runs").exists()  # no run directory, no plan file


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> Path:
    """A pretraining run of 4 iterations (checkpoints at 2 and 4): the run each resume test starts from."""
    work = tmp_path_factory.mktemp("trained")
    shutil.copytree(assets, work, dirs_exist_ok=True)
    first = launch("pretrain", PRETRAIN + ["TRAIN_ITERS=4", "SAVE_INTERVAL=2"], work)
    assert first.returncode == 0, first.stderr[-3000:]
    return work


PRETRAIN_RUN = "tiny-qwen3-pretrain-Data-good-lr0.001"
QAD_RUN = "tiny-qwen3-Teacher-tiny-qwen3-Data-good-lr0.0001"
RESUMES = {  # case -> (job, extra arguments, fragments of the one error line)
    "another_mbs": ("pretrain", ["MBS=4"], ["GBS=4 at save, 8 now", "MBS x data-parallel size: 4 x 2 now, 2 x 2"]),
    "another_gbs": ("pretrain", ["GBS=8"], ["GBS=4 at save, 8 now"]),
    "another_seq_length": ("pretrain", ["SEQ_LENGTH=32"], ["SEQ_LENGTH=64 at save, 32 now"]),
    "pretrain_run_as_qad": ("qad", [], ["saved by a pretrain job, this is a qad job"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUMES))
def test_a_resume_that_changes_the_batch_shape_or_the_job_is_refused_at_plan_time(case, trained, tmp_path):
    job, extra, expected = RESUMES[case]
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    if job == "qad":  # the pretraining run's checkpoints moved where the QAD job resumes from
        (tmp_path / "runs" / QAD_RUN).mkdir()
        (tmp_path / "runs" / PRETRAIN_RUN / "checkpoints").rename(tmp_path / "runs" / QAD_RUN / "checkpoints")
    plans = sorted((tmp_path / "runs").rglob("plan_*.json"))
    result = launch(job, {"pretrain": PRETRAIN, "qad": QAD}[job] + ["TRAIN_ITERS=8"] + extra, tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in expected), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert sorted((tmp_path / "runs").rglob("plan_*.json")) == plans  # refused before the plan file


@pytest.mark.slow
def test_the_same_batch_shape_resumes(trained, tmp_path):
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    result = launch("pretrain", PRETRAIN + ["TRAIN_ITERS=6", "GBS=4"], tmp_path)  # GBS set: MBS x DP it was
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resume (iteration 4)" in result.stderr


@pytest.mark.slow
def test_a_failure_only_a_worker_sees_ends_with_its_error_line_and_exit_2(trained, tmp_path):
    """Another model's weights under the run's model name: the plan resumes, the workers refuse the
    checkpoint's shapes. torchrun's report comes before the worker's line, which is printed once, last."""
    shutil.copytree(trained, tmp_path, dirs_exist_ok=True)
    other = tmp_path / "models" / "other"
    assert random_hf.main(["tiny-llama3", str(other)]) == 0
    result = launch("pretrain", PRETRAIN + ["TRAIN_ITERS=8", f"model.hf_checkpoint={other}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result)
    assert len(errors) == 1 and "does not match this model" in errors[0], result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr
