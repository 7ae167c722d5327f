# Run (as root): pytest -m slurm tests/slurm   (REQUIRE_SLURM=1 turns "skipped" into "failed")
"""Fixtures for tests on the real local SLURM cluster.

Every test under tests/slurm is marked `slurm`. Tests that submit jobs take `slurm_workdir`
(which brings `local_cluster` with it) or `local_cluster` itself. The session starts the
cluster with `tests/slurm/local-cluster.sh start` (idempotent, ~1 s when already up) and leaves it
running for the next session; stop it with `tests/slurm/local-cluster.sh stop`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from slurm_helpers import LOCAL_CLUSTER_SCRIPT, cluster_available  # noqa: E402

SCRIPT = LOCAL_CLUSTER_SCRIPT
REPO = HERE.parents[1]


@dataclass(frozen=True)
class LocalCluster:
    nodes: list[str]      # ['node1', 'node2']
    script: Path          # tests/slurm/local-cluster.sh
    start_output: str     # what `start` printed


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item of the session: mark only ours.
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slurm)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)  # slurm_workdir keeps the dirs of failed tests
    return rep


def _unavailable(reason: str):
    if os.environ.get("REQUIRE_SLURM") == "1":
        pytest.fail(f"REQUIRE_SLURM=1 but the local SLURM cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(f"local SLURM cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def local_cluster() -> LocalCluster:
    """Starts (or re-checks) the local cluster once per session; skips when impossible."""
    if os.geteuid() != 0:
        _unavailable(f"needs root to run {SCRIPT.relative_to(REPO)} start")
    try:
        r = subprocess.run([str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        _unavailable(f"{SCRIPT.relative_to(REPO)} start: {e}")
    out = r.stdout + r.stderr
    if r.returncode != 0:
        _unavailable(f"{SCRIPT.relative_to(REPO)} start exited {r.returncode}:\n{out[-3000:]}")
    ok, why = cluster_available()
    if not ok:
        _unavailable(why)
    nodes = [part.split(":")[0] for part in why.split()]
    return LocalCluster(nodes=nodes, script=SCRIPT, start_output=out)


@pytest.fixture
def slurm_workdir(local_cluster, request) -> Path:
    """A fresh directory under /tmp, mode 755, for job scripts and outputs (removed after a
    passing test, kept after a failing one)."""
    name = re.sub(r"[^\w.-]", "_", request.node.name)[:40]
    path = Path(tempfile.mkdtemp(prefix=f"slurm-{name}-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        shutil.rmtree(path, ignore_errors=True)
    else:
        print(f"kept {path}")
