"""python -m pytest tests/unit/test_plot.py  (PNG curves from synthetic JSONL logs; CPU, fast)"""

import json

import pytest

from train import plot
from train.runlogs import merged_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, starts):
    logs = run_dir / "logs"
    logs.mkdir(parents=True)
    for stamp, records in starts:
        with open(logs / f"m_pretrain_{stamp}.jsonl", "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.write('{"iteration": 99, "loss"')  # a line cut by a kill is ignored


def train_record(i, loss, mfu=None):
    return {"iteration": i, "time": 1000.0 + i, "loss": loss, "lr": 1e-4 * i, "grad_norm": 1.0,
            "tokens_per_s": 1000.0, "tokens_per_s_per_device": 500.0, "mfu": mfu, "memory_peak_gb": 0.3,
            "memory_allocated_gb": None, "skipped": 0, "train_iters": 6}


def test_records_of_all_job_starts_merge_in_iteration_order(tmp_path):
    write_run(tmp_path, [("20250101_000000", [train_record(i, 5.0) for i in (1, 2, 3, 4)]),
                         ("20250101_010000", [train_record(i, 4.0) for i in (3, 4, 5, 6)]
                          + [{"iteration": 6, "val_loss": 4.1, "val_ppl": 60.3}])])
    train, evaluation = merged_records(tmp_path)
    assert [r["iteration"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in train] == [5.0, 5.0, 4.0, 4.0, 4.0, 4.0]  # the later start wins
    assert [r["val_loss"] for r in evaluation] == [4.1]


def test_plot_writes_valid_pngs(tmp_path, capsys):
    write_run(tmp_path, [("20250101_000000", [train_record(i, 5.0 - i / 10, mfu=0.3) for i in range(1, 7)]
                          + [{"iteration": 3, "val_loss": 4.9, "val_ppl": 134.3}])])
    assert plot.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "loss 4.900 (iteration 1) -> 4.400 (iteration 6)"
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert {"loss.png", "val_loss.png", "lr.png", "tokens_per_s.png", "mfu.png", "overview.png"} <= names
    for path in (tmp_path / "plots").iterdir():
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def test_cpu_run_without_mfu_or_eval_skips_those_curves(tmp_path, capsys):
    write_run(tmp_path, [("20250101_000000", [train_record(i, 5.0) for i in range(1, 4)])])
    out = tmp_path / "elsewhere"
    assert plot.main([str(tmp_path), "--out", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert "mfu.png" not in names and "val_loss.png" not in names and "loss.png" in names
    assert "loss_terms.png" not in names  # a pretraining run has no QAD terms
    assert "mfu: no values" in capsys.readouterr().out


def test_qad_run_plots_its_loss_terms(tmp_path):
    write_run(tmp_path, [("20250101_000000", [{**train_record(i, 1.0), "kd_loss": 0.5, "lm_loss": 2.0}
                                              for i in range(1, 4)])])
    assert plot.main([str(tmp_path)]) == 0
    assert (tmp_path / "plots" / "loss_terms.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_errors_exit_2(tmp_path, capsys, make):
    target = tmp_path / "nope"
    if make == "empty":
        (target / "logs").mkdir(parents=True)
    assert plot.main([str(target)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
