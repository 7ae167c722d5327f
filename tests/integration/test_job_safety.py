"""python -m pytest tests/integration/test_job_safety.py  (real launchers, torchrun, gloo: workers die with
their launcher; one job per run directory; a stopped rank is named)"""

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LONG = ["training.train_iters=100000", "checkpoint.save_interval=100000"]


def launcher_env(root: Path, marker: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                     "HF_TOKEN", "TRAIN_LIFELINE", "RUN_LOCK"))}
    env.update({"QAD_CHECKPOINT_ROOT": str(root), "MODELS_ROOT": str(root / "models"), "SAFETY_MARKER": marker})
    return env


def start_launcher(root: Path, marker: str, overrides: list[str]) -> subprocess.Popen:
    """`setsid bash launchers/pretrain.sh ...`: the launcher leads a process group of its own."""
    return subprocess.Popen(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--", *overrides],
                            cwd=REPO, env=launcher_env(root, marker), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def marked_processes(marker: str) -> dict[int, str]:
    """{pid: command line} of the processes whose environment holds the marker."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"SAFETY_MARKER={marker}".encode() in (proc / "environ").read_bytes():
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile, or a zombie
            continue
    return found


def workers(marker: str) -> dict[int, str]:
    return {pid: cmd for pid, cmd in marked_processes(marker).items() if "-m train.pretrain" in cmd
            and "torchrun" not in cmd}


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill_group_and_count_survivors(launcher: subprocess.Popen, marker: str) -> dict[int, str]:
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.wait(timeout=10)
    time.sleep(10)
    survivors = marked_processes(marker)
    for pid in survivors:  # a failing test leaves no worker behind
        os.kill(pid, signal.SIGKILL)
    return survivors


def startup_file(root: Path) -> list[Path]:
    return list(root.glob("*/logs/startup_*.json"))  # written at the first step (train/launch/job.py)


@pytest.mark.slow
def test_kill_9_of_the_launcher_group_after_the_first_step_ends_every_worker(tmp_path):
    marker = uuid.uuid4().hex
    launcher = start_launcher(tmp_path, marker, LONG)
    try:
        wait_for(lambda: startup_file(tmp_path), 240, "the first step")
        assert len(workers(marker)) == 2  # tiny-qwen3: NUM_GPUS=2
        # a second job on the same run directory is refused, naming the first
        second = subprocess.run(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--", *LONG],
                                cwd=REPO, env=launcher_env(tmp_path, marker + "x"), capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and f"(pid {launcher.pid}," in errors[0] and "run.lock" in errors[0]
        survivors = kill_group_and_count_survivors(launcher, marker)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    assert survivors == {}
    # the dead launcher's lock is taken over with a warning, and the next job runs
    after = subprocess.run(["bash", str(REPO / "launchers/pretrain.sh"), "--config", "tiny-qwen3", "--",
                            "training.train_iters=1"], cwd=REPO, env=launcher_env(tmp_path, marker),
                           capture_output=True, text=True, timeout=240)
    assert after.returncode == 0, after.stderr[-3000:]
    assert f"warning: took over the lock of {startup_file(tmp_path)[0].parents[1]}" in after.stderr
    assert f"pid {launcher.pid} is gone" in after.stderr
    assert not (startup_file(tmp_path)[0].parents[1] / "run.lock").exists()  # released at exit


def kill_and_count_survivors(launcher: subprocess.Popen, marker: str, target: str) -> dict[int, str]:
    """kill -9 the launcher's process group, or only torchrun, or only node.sh; then who is left after 10 s."""
    if target == "group":
        return kill_group_and_count_survivors(launcher, marker)
    needle = {"torchrun": "torchrun", "node.sh": "launchers/node.sh"}[target]
    pid = next(pid for pid, cmd in marked_processes(marker).items() if needle in cmd)
    os.kill(pid, signal.SIGKILL)
    time.sleep(10)
    survivors = marked_processes(marker)
    for pid in survivors:  # a failing test leaves no worker behind
        os.kill(pid, signal.SIGKILL)
    return survivors


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "torchrun", "node.sh"])
def test_kill_9_during_start_up_ends_every_worker(tmp_path, target):
    marker = uuid.uuid4().hex
    launcher = start_launcher(tmp_path, marker, LONG)
    try:
        wait_for(lambda: len(workers(marker)) == 2, 120, "two worker processes")
        survivors = kill_and_count_survivors(launcher, marker, target)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    assert not startup_file(tmp_path)  # killed before the first step
    assert survivors == {}


@pytest.mark.parametrize("conf_token,warned", [("hf_FAKE_conf_value", True), ("", False)])
def test_the_command_line_token_wins_over_the_conf(tmp_path, conf_token, warned):
    conf = tmp_path / "with-token.conf"
    conf.write_text((REPO / "conf.d/tiny-qwen3.conf").read_text() + f"export HF_TOKEN={conf_token}\n")
    token_file = tmp_path / "token.txt"
    token_file.write_text("hf_FAKE_file_value\n")
    script = (f'source launchers/lib.sh; parse_args --config {conf} --hf-token-file {token_file}; '
              f'CONF_PATH={conf}; source_conf; [[ $HF_TOKEN == hf_FAKE_file_value ]] && echo file-token-used')
    result = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=launcher_env(tmp_path, "token"))
    assert result.stdout.strip() == "file-token-used", result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == (1 if warned else 0)
    assert all(str(conf) in w and "command line" in w and "hf_FAKE" not in w for w in warnings)


@pytest.mark.slow
def test_failed_saves_let_training_go_on_then_stop_the_job_with_one_error_line(tmp_path):
    """Every save fails (files over 48 KB cannot be written, as on a full disk): the first failure is
    a warning and training goes on; the second in a row (max_failed_saves=2) stops the job."""
    overrides = "training.train_iters=8 checkpoint.save_interval=2 checkpoint.max_failed_saves=2"
    script = f"trap '' XFSZ; ulimit -f 48; exec bash launchers/pretrain.sh --config tiny-qwen3 -- {overrides}"
    result = subprocess.run(["bash", "-c", script], cwd=REPO, env=launcher_env(tmp_path, "disk"),
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 4  # CheckpointSaveFailed, kept through torchrun's wrapper and the launcher
    assert "checkpoint at iteration 2 not saved" in output and "File too large" in output
    assert "iter 3 |" in output  # training went on after the first failure
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 checkpoint saves in a row failed, the last at iteration 4" in errors[0], output[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0] and "Traceback" not in result.stderr
    assert "iter 5 |" not in output
    checkpoints = next(tmp_path.glob("*/checkpoints/tiny-qwen3"))
    assert list(checkpoints.iterdir()) == []  # no .tmp left, no tracker


def worker_of_rank(marker: str, rank: int) -> int:
    """The pid of the worker torchrun started as RANK=rank."""
    for pid in workers(marker):
        if f"\0RANK={rank}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
            return pid
    raise AssertionError(f"no worker with RANK={rank}")


MAIN_BOTTOM = "in _run_module_as_main"


def stacks_files(root: Path) -> dict[int, str]:
    """{rank: text} of the run's stacks files (train/launch/watchdog.py)."""
    return {int(path.stem.rpartition("_rank")[2]): path.read_text() for path in root.glob("*/logs/stacks_*_rank*.txt")}


def complete_dumps(root: Path) -> dict[int, str] | None:
    """Both ranks' stacks files, once each holds a whole dump: the main thread comes last, and its
    outermost frame is runpy's (python -m)."""
    files = stacks_files(root)
    return files if len(files) == 2 and all(text.rstrip().endswith(MAIN_BOTTOM) for text in files.values()) else None


@pytest.mark.slow
def test_usr1_dumps_stacks_then_a_stopped_rank_ends_the_job_naming_it(tmp_path):
    """kill -USR1 the launcher: every worker appends its stacks and trains on. Then SIGSTOP rank 0:
    rank 1 waits in its next collective; its watchdog dumps its stacks, names rank 0, kills it and
    ends the job about when DIST_TIMEOUT_S is up, long before gloo's own timeout (+30 s)."""
    marker, timeout_s = uuid.uuid4().hex, 20
    launcher = start_launcher(tmp_path, marker, [*LONG, f"DIST_TIMEOUT_S={timeout_s}"])
    try:
        wait_for(lambda: startup_file(tmp_path), 240, "the first step")
        os.kill(launcher.pid, signal.SIGUSR1)  # lib.sh -> node.sh -> the workers
        by_hand = wait_for(lambda: complete_dumps(tmp_path), 30, "both ranks' stacks")
        assert all("train/trainer.py" in text for text in by_hand.values())
        assert len(workers(marker)) == 2 and launcher.poll() is None  # USR1 stopped nothing
        stopped = worker_of_rank(marker, 0)
        os.kill(stopped, signal.SIGSTOP)
        stopped_at = time.time()
        _, stderr = launcher.communicate(timeout=timeout_s + 90)
        ended_after_s = time.time() - stopped_at
    finally:
        survivors = marked_processes(marker)
        for pid in survivors:  # a failing test leaves no worker behind
            os.kill(pid, signal.SIGKILL)
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    assert launcher.returncode == 5  # EXIT_HANG, kept through torchrun's wrapper and the launcher
    # the watchdog ends rank 1 before timeout_s; then torchrun and the launcher exit (slack: a loaded machine)
    assert ended_after_s < timeout_s + 10, (ended_after_s, stderr[-3000:])
    assert survivors == {}  # the stopped rank too: the watchdog killed it
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().splitlines()[-1] == errors[0], stderr[-3000:]
    assert f"hang: rank 0 (host {socket.gethostname()}, pid {stopped}; last heartbeat " in errors[0]
    assert "stopped responding" in errors[0] and f"DIST_TIMEOUT_S={timeout_s}" in errors[0]
    stacks = stacks_files(tmp_path)
    hang_dump = stacks[1][len(by_hand[1]):]  # what rank 1 appended after the dump by hand
    assert "no step finished" in hang_dump and 'File "' in hang_dump and errors[0] in hang_dump
    assert "train/trainer.py" in hang_dump and "in train" in hang_dump  # rank 1's main thread, in the loop
    assert stacks[0] == by_hand[0]  # a stopped process dumps nothing
