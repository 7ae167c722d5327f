"""python -m pytest tests/integration/test_wandb.py  (W&B logging with the real wandb, offline mode)

Two jobs on one run directory (the second resumes the first) log to the same W&B run: one id,
kept in RUN_DIR/wandb_run_id; the offline run files hold the losses of both jobs; the config
sent has the HF token redacted and no file under WANDB_DIR contains it.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = "tiny-qwen3-pretrain-Data-synthetic-lr0.0003"
TOKEN = "hf_FAKE_wandb_test_secret_value"  # shaped so no scanner takes it for a real token
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) records


def wandb_records(path: Path):
    """The protobuf records of an offline run file (run-<id>.wandb), in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pieces = 7, b""  # 7-byte file header: ident, magic, version
    while position + 7 <= len(data):
        crc, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if BLOCK - position % BLOCK < 7 or (kind == 0 and length == 0):  # block trailer padding
            position += BLOCK - position % BLOCK
            continue
        piece = data[position + 7:position + 7 + length]
        position += 7 + length
        pieces = piece if kind in (1, 2) else pieces + piece  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def items_of(items) -> dict:
    """{key: value} of W&B items (a key is `key` or, in newer files, `nested_key` joined by /)."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def pretrain(root: Path, wandb_dir: Path, datetime: str, iterations: int) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "MASTER_", "WANDB_"))}
    env.update(RUN_DATETIME=datetime, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_DIR=str(wandb_dir),
               HF_TOKEN=TOKEN, WANDB_PROJECT="quickstart")
    result = subprocess.run(
        [sys.executable, "-m", "train.pretrain", f"checkpoint.root={root}", "model.name=tiny-qwen3",
         "data.source=synthetic", "data.dataset_name=synthetic", "data.seq_length=32", "optim.lr=3e-4",
         "training.micro_batch_size=2", "training.global_batch_size=2", f"training.train_iters={iterations}",
         "checkpoint.save_interval=3", "logging.tensorboard=false", "logging.wandb_project=quickstart",
         "logging.wandb_mode=offline"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


@pytest.mark.slow
def test_a_resumed_job_continues_the_same_offline_wandb_run_without_secrets(tmp_path):
    root, wandb_dir = tmp_path / "runs", tmp_path / "wandb"
    wandb_dir.mkdir()
    pretrain(root, wandb_dir, "20260101_000001", 3)
    pretrain(root, wandb_dir, "20260101_000002", 6)
    run_id = (root / RUN / "wandb_run_id").read_text().strip()
    run_files = sorted(wandb_dir.rglob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and all(path.name == f"run-{run_id}.wandb" for path in run_files)
    history, config = {}, {}
    for path in run_files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id and record.run.project == "quickstart"
                config.update(items_of(record.run.config.update))
            elif kind == "config":
                config.update(items_of(record.config.update))
            elif kind == "history":
                items = items_of(record.history.item)
                if "loss" in items:  # W&B's own records (system metrics) have none
                    history[items["_step"]] = items["loss"]
    logged = {}
    for path in sorted((root / RUN / "logs").glob("*.jsonl")):
        logged.update({r["iteration"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())})
    assert sorted(history) == [1, 2, 3, 4, 5, 6] and history == logged  # both jobs' losses, exact
    assert config["conf"]["HF_TOKEN"] == "<redacted>" and config["optim"]["lr"] == 3e-4
    leaks = [path for path in wandb_dir.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaks == []
