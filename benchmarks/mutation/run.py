"""Mutation check of the critical code: `python benchmarks/mutation/run.py` (or `make mutate`).

Each mutant below is a bug that matters (a file, an exact snippet of it and the snippet's
replacement; several edits make one mutant). The script copies the repository's working tree
(tracked and untracked, not ignored files) into a temporary directory, applies one mutant at a
time there (never in the working tree), runs the few fast tests that guard that code (pytest
-x -q) and restores the file. A mutant is killed when its tests fail; it survived when they
pass. First all those tests run once on the unmutated copy: they must pass, or "killed" means nothing.

Prints a Markdown table (mutant, file, result, seconds) and exits 1 when a mutant survived, a
snippet is not found exactly once (the list must follow the code: fix the snippet, keep the
bug), or the baseline fails. Not part of `make test`; about a minute on 2 idle CPU cores.

    python benchmarks/mutation/run.py [--only NAME ...] [--list] [--no-baseline]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_TIMEOUT_S = 600


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str


@dataclass(frozen=True)
class Mutant:
    name: str
    what: str  # the bug, in words
    edits: tuple[Edit, ...]
    test_files: tuple[str, ...]
    keyword: str  # pytest -k: the tests of those files that guard this code

    @property
    def pytest_args(self) -> tuple[str, ...]:
        return (*self.test_files, "-k", self.keyword)


MUTANTS = [
    Mutant("blend-normalization", "datablend weights not normalized ([0.2, 0.3] crashes)",
           (Edit("train/data/blended_dataset.py", "weights = weights / weights.sum()", "weights = weights"),),
           ("tests/unit/test_references.py",), "brute_force"),
    Mutant("kd-temperature-squared", "T instead of T^2 in the KD loss and its naive reference",
           (Edit("train/distill/chunked.py", "temperature**2 * (kl * m)", "temperature * (kl * m)"),
            Edit("train/distill/chunked.py", ".mul_(temperature * kd_loss_weight)", ".mul_(kd_loss_weight)"),
            Edit("train/distill/loss.py", "mask_tokens(mask, tokens) * temperature**2",
                 "mask_tokens(mask, tokens) * temperature")),
           ("tests/unit/test_references.py",), "kl_div or hand_computed"),
    Mutant("trainer-consumed-samples", "resume restores consumed_samples off by one",
           (Edit("train/trainer.py", 'state["consumed_samples"]', 'state["consumed_samples"] + 1'),),
           ("tests/unit/test_trainer_state.py",), "survives_a_checkpoint or load_state_dict"),
    Mutant("sampler-last-step", "the sampler drops its last full step",
           (Edit("train/data/sampler.py", "(self.total_samples - self.consumed_samples) // self.samples_per_step",
                 "(self.total_samples - self.consumed_samples - 1) // self.samples_per_step"),),
           ("tests/unit/test_data_datasets.py",), "sampler"),
    Mutant("registry-rope-theta", "Qwen3 presets with rope_theta 1e4 instead of 1e6",
           (Edit("train/models/registry.py", '_QWEN3 = dict(family="qwen3", rope_theta=1_000_000.0',
                 '_QWEN3 = dict(family="qwen3", rope_theta=10_000.0'),),
           ("tests/unit/test_models_registry.py",), "presets_match_the_public"),
    Mutant("checkpoint-publish-order", "the tracker names the checkpoint before its directory is renamed",
           (Edit("train/checkpoint.py", "        os.replace(temporary, final)\n", ""),
            Edit("train/checkpoint.py", "os.replace(tracker_tmp, self.directory / TRACKER_FILE)\n",
                 "os.replace(tracker_tmp, self.directory / TRACKER_FILE)\n        os.replace(temporary, final)\n")),
           ("tests/unit/test_checkpoint.py",), "fsynced_before_the_rename"),
    Mutant("gbs-divisibility", "GBS checked against MBS only, not MBS x data-parallel size",
           (Edit("train/launch/plan.py", "if gbs % (mbs * data_parallel):", "if gbs % mbs:"),),
           ("tests/unit/test_launch_plan.py",), "gbs_must_be"),
    Mutant("secret-redaction", "secret names matched case-sensitively (hf_token leaks)",
           (Edit("train/launch/conf.py", "upper = name.upper()", "upper = name"),),
           ("tests/unit/test_launch_conf.py",), "redact or secret_names"),
    Mutant("nvfp4-rounding", "E2M1 rounding: 2.5 rounds up to 3 instead of to even (2)",
           (Edit("train/quant/nvfp4.py", "q = torch.where(a <= 2.5, 2.0, q)", "q = torch.where(a < 2.5, 2.0, q)"),),
           ("tests/unit/test_references.py",), "e2m1"),
    Mutant("rope-llama3-scaling", "LLaMA 3 RoPE scaling leaves the low frequencies undivided",
           (Edit("train/models/common/rope.py", "inv_freq / factor, inv_freq)", "inv_freq, inv_freq)"),),
           ("tests/unit/test_references.py",), "llama3_rope"),
]


def copy_working_tree(destination: Path) -> None:
    """Tracked and untracked files that git does not ignore: the code as it stands, no run outputs."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
    for relative in filter(None, listing.split("\0")):
        source = REPO / relative
        if source.is_file():  # a deleted tracked file is still listed
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def missing_snippets(mutant: Mutant, root: Path) -> list[str]:
    """Edits whose snippet is not found exactly once (read from the unmutated files)."""
    problems = []
    for edit in mutant.edits:
        path = root / edit.path
        count = path.read_text().count(edit.original) if path.is_file() else 0
        if count != 1:
            problems.append(f"{edit.path}: snippet {edit.original.strip()!r} found {count} times, expected once")
    return problems


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {TEST_TIMEOUT_S} s"
    summary = (result.stdout.strip() or result.stderr.strip()).splitlines()  # pytest's last line: the counts
    return result.returncode, summary[-1] if summary else ""


def apply(mutant: Mutant, root: Path) -> dict[Path, str]:
    """Applies the edits in order; returns the original text of each file touched."""
    originals = {}
    for edit in mutant.edits:
        path = root / edit.path
        originals.setdefault(path, path.read_text())
        path.write_text(path.read_text().replace(edit.original, edit.replacement, 1))
    return originals


def verdict(returncode: int) -> str:
    """pytest: 0 all passed (the mutant survived), 1 a test failed (killed); anything else an error."""
    return {0: "survived", 1: "killed", 124: "error: timeout"}.get(returncode, f"error: pytest exit {returncode}")


def run_mutant(mutant: Mutant, root: Path) -> tuple[str, float, str]:
    problems = missing_snippets(mutant, root)
    if problems:
        return "snippet not found", 0.0, "; ".join(problems)
    originals = apply(mutant, root)
    start = time.time()
    try:
        returncode, last_line = run_tests(root, mutant.pytest_args)
    finally:
        for path, text in originals.items():
            path.write_text(text)
    return verdict(returncode), time.time() - start, last_line


def baseline(mutants: list[Mutant], root: Path) -> tuple[bool, float, str]:
    """The mutants' tests on the unmutated copy in one pytest run (torch imported once): all their
    files, their keywords or-ed (a superset of each mutant's selection)."""
    files = sorted({name for mutant in mutants for name in mutant.test_files})
    keyword = " or ".join(f"({mutant.keyword})" for mutant in mutants)
    start = time.time()
    returncode, last_line = run_tests(root, (*files, "-k", keyword))
    return returncode == 0, time.time() - start, last_line


def table(rows: list[tuple[str, str, str, float]]) -> str:
    lines = ["| mutant | file | result | seconds |", "|---|---|---|---|"]
    lines += [f"| {name} | {files} | {result} | {seconds:.1f} |" for name, files, result, seconds in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    args = parser.parse_args(argv)
    if args.list:
        for mutant in MUTANTS:
            print(f"{mutant.name}: {mutant.what} ({', '.join(sorted({e.path for e in mutant.edits}))})")
        return 0
    unknown = sorted(set(args.only or []) - {m.name for m in MUTANTS})
    if unknown:
        print(f"error: unknown mutant {', '.join(unknown)} (--list shows them)", file=sys.stderr)
        return 2
    mutants = [m for m in MUTANTS if not args.only or m.name in args.only]
    started = time.time()
    failed = False
    with tempfile.TemporaryDirectory(prefix="mutation-") as directory:
        root = Path(directory)
        copy_working_tree(root)
        if not args.no_baseline:
            ok, seconds, message = baseline(mutants, root)
            print(f"baseline (unmutated): {'passed' if ok else 'FAILED'} in {seconds:.0f} s {message}", flush=True)
            if not ok:
                return 1
        rows = []
        for mutant in mutants:
            result, seconds, detail = run_mutant(mutant, root)
            print(f"{mutant.name}: {result} ({seconds:.1f} s) {detail}", flush=True)
            failed |= result != "killed"
            rows.append((mutant.name, ", ".join(sorted({e.path for e in mutant.edits})), result, seconds))
    print()
    print(table(rows))
    killed = sum(row[2] == "killed" for row in rows)
    print(f"\n{killed}/{len(rows)} killed in {time.time() - started:.0f} s")
    if any(row[2] == "snippet not found" for row in rows):
        print("snippet not found: the code changed; update that mutant's snippet in MUTANTS "
              "(benchmarks/mutation/run.py), keeping the bug it makes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
