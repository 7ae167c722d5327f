"""Reading a run directory's JSONL metric logs (shared by train.plot and train.status).

Stdlib only: plotting and status work on a login node without torch.
Each job start of a run appends to its own logs/<model>_<job>_<datetime>.jsonl; the file
names sort by start time. Merging them: records are taken in file order, and a later job
start's record for an iteration replaces an earlier one (a job that resumed from an older
checkpoint re-ran those iterations). Training records have "loss"; evaluation records
have "val_loss" and are kept apart, so both exist for one iteration.
"""

import json
from pathlib import Path


def jsonl_files(run_dir: Path) -> list[Path]:
    return sorted((Path(run_dir) / "logs").glob("*.jsonl"), key=lambda p: (p.name.rsplit("_", 2)[-2:], p.name))


def read_jsonl(path: Path) -> list[dict]:
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("iteration"), int):
            records.append(record)
    return records


def merged_records(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) over all job starts, in iteration order."""
    train, evaluation = {}, {}
    for path in jsonl_files(run_dir):
        for record in read_jsonl(path):
            if "val_loss" in record:
                evaluation[record["iteration"]] = record
            elif "loss" in record:
                train[record["iteration"]] = record
    return [train[i] for i in sorted(train)], [evaluation[i] for i in sorted(evaluation)]


def number(value) -> float | None:
    """A plottable float: None for null, strings ("nan" as logged), bools."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)
