"""python -m pytest tests/slurm/test_model_families_slurm.py  (as root; wrap in `flock /tmp/slurm-cluster.lock`)

The tiny Qwen3-MoE and Qwen3-Next confs through `sbatch --nodes=2 slurm/pretrain.sh` on the local
cluster: 4 ranks (2 nodes x 2 procs, DDP over gloo) train the router and grouped experts (MoE),
the Gated DeltaNet, gated attention and MoE layers (Next), and checkpoint.
"""

import json
from pathlib import Path

import pytest

from slurm_helpers import job_field, sbatch, wait_for_state

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model, timeout_s", [("tiny-qwen3-moe", 240), ("tiny-qwen3-next", 300)])
def test_two_node_pretraining(slurm_workdir, model, timeout_s):
    root, run = slurm_workdir / "runs", f"{model}-pretrain-Data-synthetic-lr0.001"
    env = {"QAD_CHECKPOINT_ROOT": str(root), "PYTHONPATH": str(REPO), "HF_TOKEN": None}
    job = sbatch(["--nodes=2", str(REPO / "slurm/pretrain.sh"), "--config", f"conf.d/{model}.conf", "--",
                  "training.train_iters=4", "checkpoint.save_interval=2"], cwd=slurm_workdir, env=env)
    wait_for_state(job, {"COMPLETED"}, timeout_s=timeout_s)
    assert job_field(job, "NodeList") == "node[1-2]"
    out = next((root / "logs_slurm").glob(f"local-pretrain_{job}_*.log")).read_text()
    assert "world size 4 (2 nodes x 2 procs)" in out
    checkpoints = root / run / "checkpoints" / model
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    records = [json.loads(line) for line in next((root / run / "logs").glob("*.jsonl")).read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in records)
