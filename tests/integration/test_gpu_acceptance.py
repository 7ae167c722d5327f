"""benchmarks/gpu: the GPU acceptance script, run here in its CPU smoke mode, and its wheel download.

    python -m pytest -q tests/integration/test_gpu_acceptance.py   (~5 min on 2 cores)

The smoke mode runs every part of the GPU run (tests/gpu, training steps with activation
checkpointing, compile and FSDP2 mixed precision, the memory plan beside each, a real QAD job
twice, loss memory, async save, the largest micro-batch) on tiny sizes on the CPU, so that the
script is known to work before device time is spent on it.
"""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU = REPO / "benchmarks" / "gpu"


def load_runner():
    spec = importlib.util.spec_from_file_location("gpu_run", GPU / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_cpu_smoke_runs_every_part_end_to_end(tmp_path):
    done = subprocess.run(["bash", str(GPU / "run.sh"), "--cpu-smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=1900)
    results = json.loads((tmp_path / "results.json").read_text())
    statuses = {part["part"]: part["status"] for part in results["parts"]}
    assert done.returncode == 0 and set(statuses.values()) == {"ok"}, (statuses, done.stdout[-3000:])
    expected = [name for name, _, in_smoke in load_runner().PARTS if in_smoke]
    assert list(statuses) == expected
    parts = {part["part"]: part for part in results["parts"]}
    step = parts["train_step:eager"]["rows"][0]
    assert step["tokens_per_s"] > 0 and step["plan_gb"] > step["plan_tensors_gb"] > 0
    qad = parts["qad_step"]["rows"]
    assert len(qad) == 2 and len(qad[0]["losses"]) == 3 and qad[0]["max_relative_difference"] <= 1e-2
    losses = {row["loss"]: row["value"] for row in parts["loss_memory"]["rows"]}
    assert losses["lm fused"] == pytest.approx(losses["lm naive"], rel=1e-3)
    assert losses["kd chunked"] == pytest.approx(losses["kd naive"], rel=1e-3)
    assert [row["async_save"] for row in parts["async_save"]["rows"]] == [False, True]
    assert all(row["mbs"] >= 1 for row in parts["max_micro_batch"]["rows"])
    report = (tmp_path / "results.md").read_text()
    assert "| train_step:fsdp_mixed_precision | ok |" in report and "## qad_step" in report


def test_a_part_over_its_cap_is_recorded_and_the_next_one_runs(tmp_path):
    runner = load_runner()
    with open(tmp_path / "parts.log", "w") as log:
        slow = runner.run_part("train_step:eager", "smoke", tmp_path, timeout_s=0.5, log=log)
        quick = runner.run_part("environment", "smoke", tmp_path, timeout_s=120, log=log)
    assert slow["status"] == "timeout" and quick["status"] == "ok", (slow, quick)
    assert quick["rows"][0]["torch"]


def test_an_unknown_part_is_one_error_line(tmp_path):
    done = subprocess.run([sys.executable, str(GPU / "run.py"), "--cpu-smoke", "--out", str(tmp_path),
                           "--only", "environment,mfu"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: --only: unknown part(s) mfu"), done.stderr
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_gpu_wheels_downloads_every_listed_package_for_python_312(tmp_path):
    """make gpu-wheels: one wheel per name of wheels.txt, at the version installed here, cp312 or pure Python."""
    done = subprocess.run(["bash", str(GPU / "wheels.sh")], cwd=REPO, env={**__import__("os").environ,
                          "DEST": str(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    names = [line.strip() for line in (GPU / "wheels.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    wheels = [path.name for path in tmp_path.glob("*.whl")]
    for name in names:
        from importlib.metadata import version

        stem = f"{re.sub(r'[-_.]+', '_', name).lower()}-{version(name)}-"
        matching = [w for w in wheels if w.lower().startswith(stem)]
        assert len(matching) == 1, (name, stem, wheels)
        assert re.search(r"-(py3-none-any|cp312-cp312-manylinux\S*|cp3\d-abi3-manylinux\S*)\.whl$", matching[0]), matching
