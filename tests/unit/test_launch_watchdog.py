"""python -m pytest tests/unit/test_launch_watchdog.py  (heartbeat files, who is stopped, the hang line; the
whole path, a stopped worker of a real job, is tests/integration/test_job_safety.py)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.launch.watchdog import (HangWatchdog, beat_seconds, flight_recorder_env, read_heartbeats, stacks_path,
                                   stopped_ranks)

REPO = Path(__file__).resolve().parents[2]


def watchdogs(tmp_path, world_size: int = 3, job: str = "20261205_010203") -> list[HangWatchdog]:
    dogs = [HangWatchdog(tmp_path, job, rank, world_size, timeout_s=60) for rank in range(world_size)]
    (tmp_path / "heartbeats").mkdir()
    return dogs


def test_a_rank_whose_beat_count_does_not_move_is_stopped(tmp_path):
    dogs = watchdogs(tmp_path)
    for dog in dogs:
        dog.beat()
    before = read_heartbeats(tmp_path / "heartbeats", dogs[0].job, 3)
    dogs[0].beat()
    dogs[1].beat()  # rank 2 stopped beating
    after = read_heartbeats(tmp_path / "heartbeats", dogs[0].job, 3)
    assert stopped_ranks(before, after, me=0, world_size=3) == [2]
    assert 2 not in stopped_ranks(before, after, me=2, world_size=3)  # the rank asking is alive


def test_an_older_jobs_heartbeat_counts_as_none(tmp_path):
    dogs = watchdogs(tmp_path, world_size=2)
    dogs[0].beat()
    old = json.loads((tmp_path / "heartbeats" / "rank0.json").read_text()) | {"rank": 1, "job": "20261204_000000"}
    (tmp_path / "heartbeats" / "rank1.json").write_text(json.dumps(old))
    beats = read_heartbeats(tmp_path / "heartbeats", dogs[0].job, 2)
    assert list(beats) == [0]
    assert stopped_ranks(beats, beats, me=0, world_size=2) == [1]


def test_the_hang_line_names_the_stopped_rank_or_lists_every_ranks_step(tmp_path):
    dogs = watchdogs(tmp_path, world_size=2)
    dogs[0].progress(7)
    dogs[1].progress(5)
    for dog in dogs:
        dog.beat()
    beats = read_heartbeats(tmp_path / "heartbeats", dogs[0].job, 2)
    stacks = stacks_path(tmp_path, dogs[0].job, 0)
    named = dogs[0].hang_message([1], beats, 55.2, stacks)
    assert named.startswith(f"hang: rank 1 (host {beats[1]['host']}, pid {beats[1]['pid']}; last heartbeat ")
    assert "at step 5) stopped responding; rank 0 waited 55 s after step 7 (DIST_TIMEOUT_S=60)" in named
    assert f"{tmp_path}/stacks_{dogs[0].job}_rank*.txt" in named
    live = dogs[0].hang_message([], beats, 55.2, stacks)
    assert "every rank's heartbeat is live" in live and "rank 0 step 7, rank 1 step 5" in live


def test_beats_and_flight_recorder_settings(tmp_path):
    assert beat_seconds(1800) == 10 and beat_seconds(30) == 1 and beat_seconds(1) == 0.2
    env = flight_recorder_env({"TORCH_NCCL_TRACE_BUFFER_SIZE": "100"}, None)
    assert env == {"TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}  # the conf's value wins; no plan: torch's default file
    assert flight_recorder_env({}, tmp_path)["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == f"{tmp_path}/nccl_trace_rank_"


@pytest.mark.parametrize("send_usr1", [True, False])
def test_usr1_appends_every_threads_stack_and_a_normal_exit_leaves_no_empty_file(tmp_path, send_usr1):
    script = ("import os, signal, sys; from train.launch.watchdog import dump_stacks_on_signal; "
              f"dump_stacks_on_signal(sys.argv[1], 'dt', 3); {'os.kill(os.getpid(), signal.SIGUSR1)' * send_usr1}")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=REPO, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    path = stacks_path(tmp_path, "dt", 3)
    if send_usr1:
        assert path.read_text().startswith("Current thread") and 'File "<string>", line 1 in <module>' in path.read_text()
    else:
        assert not path.exists()
