"""python -m pytest tests/slurm/test_qad_job.py  (as root: tiny QAD via sbatch --nodes=2 on tests/slurm/local-cluster.sh)"""

import os
from pathlib import Path

import pytest

from slurm_helpers import job_field, job_report, sbatch, wait_for_state

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-Teacher-tiny-qwen3-Data-synthetic-lr0.0001"


@pytest.mark.slow
def test_two_node_qad_job_quantizes_the_student_and_checkpoints_the_quantizers(slurm_workdir):
    import torch
    import torch.distributed.checkpoint as dcp

    from train.models import build_model, init_weights, save_hf

    models, root = slurm_workdir / "models", slurm_workdir / "runs"
    save_hf(init_weights(build_model("tiny-qwen3", device="cpu"), 1), models / "tiny-qwen3")  # student = teacher
    env = {name: None for name in os.environ if name.startswith("SLURM_") or name == "HF_TOKEN"}
    env.update(QAD_CHECKPOINT_ROOT=str(root), MODELS_ROOT=str(models), NUM_GPUS="1", PYTHONPATH=str(REPO))
    job = sbatch(["--nodes=2", str(REPO / "slurm/qad.sh"), "--config", "conf.d/tiny-qwen3-qad.conf", "--",
                  "training.train_iters=2", "checkpoint.save_interval=2", "quant.calibration_batches=2"],
                 cwd=slurm_workdir, env=env)
    wait_for_state(job, {"COMPLETED"}, timeout_s=420)
    assert job_field(job, "NodeList") == "node[1-2]", job_report(job)
    output = "".join(p.read_text() for p in (root / "logs_slurm").glob(f"*_{job}_*.log"))
    assert "world size 2 (2 nodes x 1 procs)" in output
    assert "calibration batch 2/2" in output and "quantized with recipe nvfp4" in output
    checkpoint = root / RUN / "checkpoints" / "tiny-qwen3" / "iter_0000002"
    assert torch.load(checkpoint / "quantizer_state.pt", weights_only=False)["recipe"] == "nvfp4"
    keys = set(dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)
    assert "model.layers.0.mlp.down_proj.input_quantizer._amax" in keys
    assert (root / RUN / "checkpoints" / "tiny-qwen3" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


@pytest.mark.slow
def test_eval_wrapper_after_a_qad_job_reports_teacher_ptq_and_qad(slurm_workdir):
    """sbatch slurm/qad.sh, then sbatch slurm/eval.sh on the same conf: lm-eval's accuracy on the
    local example task for the teacher, the PTQ student and the QAD student, in RUN_DIR/logs/."""
    import json

    from tests.fixtures.synthetic_data import build_tokenizer, generate_documents
    from train.models import build_model, init_weights, save_hf

    task = REPO / "docs" / "examples" / "downstream" / "tiny_mc.yaml"
    models, root = slurm_workdir / "models", slurm_workdir / "runs"
    save_hf(init_weights(build_model("tiny-qwen3", device="cpu"), 1), models / "tiny-qwen3")  # student = teacher
    texts = generate_documents(50, 40) + (task.parent / "tiny_mc.jsonl").read_text().splitlines()
    build_tokenizer(str(models / "tiny-qwen3"), texts, 400)
    env = {name: None for name in os.environ if name.startswith("SLURM_") or name == "HF_TOKEN"}
    env.update(QAD_CHECKPOINT_ROOT=str(root), MODELS_ROOT=str(models), NUM_GPUS="1", PYTHONPATH=str(REPO),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    trained = sbatch([str(REPO / "slurm/qad.sh"), "--config", "conf.d/tiny-qwen3-qad.conf", "--",
                      "training.train_iters=2", "checkpoint.save_interval=2", "quant.calibration_batches=2"],
                     cwd=slurm_workdir, env=env)
    wait_for_state(trained, {"COMPLETED"}, timeout_s=420)
    evaluated = sbatch([f"--dependency=afterok:{trained}", str(REPO / "slurm/eval.sh"), "--config",
                        "conf.d/tiny-qwen3-qad.conf", "--tasks", str(task)], cwd=slurm_workdir, env=env)
    wait_for_state(evaluated, {"COMPLETED"}, timeout_s=600)
    reports = sorted((root / RUN / "logs").glob("downstream_*.json"))
    assert len(reports) == 1, job_report(evaluated)
    results = json.loads(reports[0].read_text())["results"]
    assert list(results) == ["teacher", "PTQ", "QAD"]
    assert all(0.0 <= results[label]["tiny_mc"]["acc,none"] <= 1.0 for label in results)
