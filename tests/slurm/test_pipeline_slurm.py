"""python -m pytest tests/slurm/test_pipeline_slurm.py  (as root; the local two-node cluster)

PP_SIZE=2 over two nodes, one pipeline stage per node (the (pp, dp, tp) mesh puts stages
outermost: ranks 0-1 on node1 are stage 0, ranks 2-3 on node2 stage 1), each stage data-parallel
over its node's 2 processes with the conf's DP_SHARDING=ddp. Its losses, gradient norms and
in-loop val_loss (EVAL_INTERVAL=3: micro-batches through the stages, train/parallel/pipeline.py
forward_logits) equal a PP_SIZE=1 job on one node with the same data-parallel size (2) and GBS.
"""

import json
from pathlib import Path

from slurm_helpers import job_field, sbatch, wait_for_state

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-pretrain-Data-synthetic-lr0.001"


def pretraining_job(workdir: Path, name: str, nodes: int, pp: int) -> tuple[int, Path]:
    """tiny-qwen3, 2 processes a node, GBS 8 = MBS 2 x dp 2 x 2 micro-batches (1F1B needs >= PP_SIZE)."""
    root = workdir / name
    env = {"QAD_CHECKPOINT_ROOT": str(root), "PYTHONPATH": str(REPO), "HF_TOKEN": None, "PP_SIZE": str(pp),
           "GBS": "8", "EVAL_INTERVAL": "3", "TRAIN_ITERS": "3", "SAVE_INTERVAL": "3"}
    job = sbatch([f"--nodes={nodes}", str(REPO / "slurm/pretrain.sh"), "--config", "conf.d/tiny-qwen3.conf"],
                 cwd=workdir, env=env)
    return job, root


def metrics(root: Path) -> list[dict]:
    return [json.loads(line) for line in next((root / RUN / "logs").glob("*.jsonl")).read_text().splitlines()]


def test_one_stage_per_node_matches_one_stage(slurm_workdir):
    pipelined, pipelined_root = pretraining_job(slurm_workdir, "pp2", nodes=2, pp=2)
    reference, reference_root = pretraining_job(slurm_workdir, "pp1", nodes=1, pp=1)
    for job in (pipelined, reference):
        wait_for_state(job, {"COMPLETED"}, timeout_s=240)
    assert job_field(pipelined, "NodeList") == "node[1-2]"
    out = next((pipelined_root / "logs_slurm").glob(f"local-pretrain_{pipelined}_*.log")).read_text()
    assert "world size 4 (2 nodes x 2 procs)" in out
    assert "pipeline: stage 0 of 2, blocks per stage 2,2" in out
    assert "parallelism: pp 2 x dp 2 (ddp) x tp 1 x ep 1" in out
    got, want = metrics(pipelined_root), metrics(reference_root)
    assert [sorted(r) for r in got] == [sorted(r) for r in want]  # the same records: 3 steps, 1 evaluation
    assert [r["iteration"] for r in got if "loss" in r] == [1, 2, 3]
    assert [r["iteration"] for r in got if "val_loss" in r] == [3]
    for mine, theirs in zip(got, want):
        for key in ("loss", "val_loss"):
            if key in theirs:
                assert abs(mine[key] - theirs[key]) <= 1e-5 * abs(theirs[key]), (key, mine, theirs)
        if "grad_norm" in theirs:
            assert abs(mine["grad_norm"] - theirs["grad_norm"]) <= 1e-4 * theirs["grad_norm"], (mine, theirs)
    checkpoints = pipelined_root / RUN / "checkpoints" / "tiny-qwen3"
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
