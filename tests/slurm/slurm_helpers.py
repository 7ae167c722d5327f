# Used by tests/slurm (pytest -m slurm tests/slurm); import with `from slurm_helpers import ...`.
"""Small helpers for tests that drive the real local SLURM cluster (tests/slurm/local-cluster.sh).

No sacct on the local cluster: job state comes from `scontrol show job` (finished jobs stay
there for an hour, MinJobAge=3600). Polling is every 0.2 s; never use `sbatch --wait`
(it polls at 2, 4, 8 s).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping

LOCAL_CLUSTER_SCRIPT = Path(__file__).resolve().parent / "local-cluster.sh"
POLL_S = 0.2
# States after which a job does not change any more (unless requeued).
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
     "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
)
_KEY = re.compile(r"(?:^|(?<=\s))([A-Za-z][\w:/]*)=")


def _run(cmd: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


def cluster_available() -> tuple[bool, str]:
    """(True, 'node1:idle node2:idle') when slurmctld answers and every node is up,
    else (False, why)."""
    if shutil.which("scontrol") is None:
        return False, "scontrol not found (run tests/slurm/local-cluster.sh start as root)"
    try:
        ping = _run(["scontrol", "ping"], timeout=10)
        if "is UP" not in ping.stdout:
            return False, f"slurmctld not answering: {(ping.stdout + ping.stderr).strip()}"
        nodes = _run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"slurm commands failed: {e}"
    states = dict(line.split() for line in sorted(set(nodes.stdout.splitlines())) if line.strip())
    if not states:
        return False, f"sinfo lists no nodes: {nodes.stderr.strip()}"
    bad = {n: s for n, s in states.items() if s not in ("idle", "mix", "alloc", "comp")}
    if bad:
        return False, f"nodes not up: {bad}"
    return True, " ".join(f"{n}:{s}" for n, s in states.items())


def sbatch(args: Iterable[str], cwd: str | os.PathLike, env: Mapping[str, str | None] | None = None) -> int:
    """`sbatch --parsable *args` run in cwd; returns the job id.

    env: variables set on top of os.environ (a None value removes the variable); the job
    inherits this environment (sbatch --export=ALL). Raises RuntimeError with sbatch's
    stderr when the submission fails.
    """
    full_env = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = str(v)
    cmd = ["sbatch", "--parsable", *map(str, args)]
    r = _run(cmd, cwd=str(cwd), env=full_env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} (cwd {cwd}) failed rc={r.returncode}: {r.stderr.strip()}")
    return int(r.stdout.strip().split(";")[0])


def show_job(job_id: int) -> str:
    """`scontrol show job -o ID` (one line of Key=Value); '' when the job is unknown."""
    try:
        r = _run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15)
    except subprocess.TimeoutExpired:
        return ""
    return r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""


def parse_fields(line: str) -> dict[str, str]:
    """Key=Value pairs of one `scontrol show ... -o` line; values may contain spaces."""
    keys = list(_KEY.finditer(line))
    out = {}
    for m, nxt in zip(keys, keys[1:] + [None]):
        out.setdefault(m.group(1), line[m.end(): nxt.start() if nxt else len(line)].strip())
    return out


def job_field(job_id: int, name: str) -> str:
    """One field of `scontrol show job`, e.g. job_field(j, 'ExitCode') -> '0:0',
    'Restarts', 'NodeList', 'StdOut', 'Reason'. KeyError when absent or the job is unknown."""
    fields = parse_fields(show_job(job_id))
    if name not in fields:
        raise KeyError(f"job {job_id} has no field {name!r} (known: {sorted(fields)})")
    return fields[name]


def job_state(job_id: int) -> str:
    """JobState, e.g. PENDING RUNNING COMPLETING COMPLETED FAILED CANCELLED TIMEOUT;
    'UNKNOWN' when scontrol does not know the job (or does not answer)."""
    return parse_fields(show_job(job_id)).get("JobState", "UNKNOWN")


def _tail(path: str, n: int = 30) -> str:
    try:
        return "".join(Path(path).read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError as e:
        return f"<{e}>"


def job_report(job_id: int) -> str:
    """scontrol's view of the job plus the tails of its stdout/stderr files, for failures."""
    try:
        text = _run(["scontrol", "show", "job", str(job_id)], timeout=15).stdout
    except subprocess.TimeoutExpired:
        text = "<scontrol show job timed out>"
    fields = parse_fields(show_job(job_id))
    for key in ("StdOut", "StdErr"):
        path = fields.get(key)
        if path and (key == "StdOut" or path != fields.get("StdOut")):
            text += f"\n----- {key} {path} (tail):\n{_tail(path)}"
    return text


def wait_for_state(job_id: int, states: Iterable[str], timeout_s: float,
                   terminal_is_error: bool = True) -> str:
    """Poll every 0.2 s until the job's state is in `states`; returns that state.

    Raises TimeoutError after timeout_s, and (with terminal_is_error) RuntimeError as soon
    as the job ends in a terminal state not in `states`; both carry job_report().
    """
    wanted = set(states)
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if terminal_is_error and state in TERMINAL_STATES:
            raise RuntimeError(f"job {job_id} ended {state}, waited for {sorted(wanted)}\n{job_report(job_id)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {state} after {timeout_s} s, waited for "
                               f"{sorted(wanted)}\n{job_report(job_id)}")
        time.sleep(POLL_S)


def wait_for_file(path: str | os.PathLike, timeout_s: float, contains: str | None = None) -> Path:
    """Poll every 0.2 s until `path` exists (and, if given, its text contains `contains`)."""
    p = Path(path)
    deadline = time.monotonic() + timeout_s
    while True:
        if p.exists() and (contains is None or contains in p.read_text(errors="replace")):
            return p
        if time.monotonic() > deadline:
            what = f"containing {contains!r}" if contains else "to exist"
            seen = f"; content tail:\n{_tail(str(p))}" if p.exists() else ""
            raise TimeoutError(f"{p} not {what} after {timeout_s} s{seen}")
        time.sleep(POLL_S)


def squeue_ids() -> list[int]:
    """Ids of the jobs squeue lists (pending, running, completing), ascending."""
    r = _run(["squeue", "-h", "-o", "%A"], timeout=15)
    if r.returncode != 0:
        raise RuntimeError(f"squeue failed: {r.stderr.strip()}")
    return sorted(int(x) for x in r.stdout.split())
