"""python -m train.launch.torchrun ARGS: torchrun (same arguments) ending with the worker's own error.

launchers/node.sh runs this in place of the `torchrun` of the plan's node command. A worker that
stops on bad input (train.launch.job.fail) leaves its `error: ...` line in torchrun's per-worker
error file (TORCHELASTIC_ERROR_FILE) instead of printing it; when the workers fail, this prints
the first such line, last, once, and exits with that worker's code (2), where torchrun itself
would exit 1 under its ChildFailedError traceback. Any other failure (a crash, a signal) keeps
torchrun's report and exit code. In a batch job srun reports the failed task after that, so the
line goes to the batch script instead (TRAIN_ERROR_LINE_FILE), which prints it after srun returns.
"""

from __future__ import annotations

import json
import os
import sys
import time

# Set for the workers: fail() records its line for this process to print instead of printing it.
RECORD_VARIABLE = "TRAIN_ERROR_RECORD"
RECORD_KEY = "train_exit_code"  # in the error file's extraInfo: written by fail(), not by torch's @record
LAUNCHER_FILE_VARIABLE = "TRAIN_ERROR_LINE_FILE"  # batch jobs: the line for the launcher to print last


def write_error_record(message: str, code: int) -> bool:
    """fail() in a worker under this wrapper: the line and exit code into torchrun's error file.
    False when there is no such file to write (run by hand, plain torchrun): print it yourself."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.environ.get(RECORD_VARIABLE) != "1":
        return False
    record = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time())),
                                                            "py_callstack": "", RECORD_KEY: code}}}
    try:
        with open(path, "w") as file:
            json.dump(record, file)
    except OSError:
        return False
    return True


def recorded_failure(failures: dict) -> tuple[str, int] | None:
    """(error line, exit code) of the first worker that stopped through fail(); None if none did."""
    records = [(f.timestamp, f.local_rank, f.error_file_data["message"]) for f in failures.values()
               if isinstance(f.error_file_data.get("message"), dict)
               and RECORD_KEY in f.error_file_data["message"].get("extraInfo", {})]
    if not records:
        return None
    record = min(records, key=lambda r: r[:2])[2]  # the first in time, then the lowest local rank
    return record["message"], int(record["extraInfo"][RECORD_KEY])


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    os.environ[RECORD_VARIABLE] = "1"  # inherited by the workers torchrun starts
    try:
        run(parse_args(argv))
    except ChildFailedError as error:
        failure = recorded_failure(error.failures)
        if failure is None:
            raise
        message, code = failure
        if not hand_to_launcher(message, code):
            print(message, file=sys.stderr, flush=True)
        return code
    return 0


def hand_to_launcher(message: str, code: int) -> bool:
    """Under srun (launchers/lib.sh sets TRAIN_ERROR_LINE_FILE): the line and code go into that file,
    the first node's only, and the batch script prints it after srun's own `srun: error:` lines, so
    that it is still the last line of the job's output. False without the variable."""
    path = os.environ.get(LAUNCHER_FILE_VARIABLE)
    if not path:
        return False
    try:
        with open(path, "x") as file:  # "x": another node's worker was first
            file.write(f"{code}\n{message}\n")
    except FileExistsError:
        pass
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
