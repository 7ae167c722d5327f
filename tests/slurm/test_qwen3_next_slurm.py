"""python -m pytest tests/slurm/test_qwen3_next_slurm.py  (as root; wrap in `flock /tmp/slurm-cluster.lock`)

The tiny Qwen3-Next conf through `sbatch --nodes=2 slurm/pretrain.sh` on the local cluster:
4 ranks (2 nodes x 2 procs, DDP over gloo) train the Gated DeltaNet, gated attention and MoE
layers and checkpoint.
"""

import json
from pathlib import Path

from slurm_helpers import job_field, sbatch, wait_for_state

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-next-Data-synthetic-lr0.001"


def test_two_node_qwen3_next_pretraining(slurm_workdir):
    root = slurm_workdir / "runs"
    env = {"QAD_CHECKPOINT_ROOT": str(root), "PYTHONPATH": str(REPO), "HF_TOKEN": None}
    job = sbatch(["--nodes=2", str(REPO / "slurm/pretrain.sh"), "--config", "conf.d/tiny-qwen3-next.conf", "--",
                  "training.train_iters=4", "checkpoint.save_interval=2"], cwd=slurm_workdir, env=env)
    wait_for_state(job, {"COMPLETED"}, timeout_s=300)
    assert job_field(job, "NodeList") == "node[1-2]"
    out = next((root / "logs_slurm").glob(f"local-pretrain_{job}_*.log")).read_text()
    assert "world size 4 (2 nodes x 2 procs)" in out
    checkpoints = root / RUN / "checkpoints" / "tiny-qwen3-next"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    records = [json.loads(line) for line in next((root / RUN / "logs").glob("*.jsonl")).read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in records)
