"""Fixtures that more than one integration file reads, each run once per pytest session: jobs
(the QAD runs of test_qad.py, test_sharded_load.py, test_export.py and test_downstream.py) and
shared_launch, one torchrun per process count for the worker cases of every selected test.

A test that changes a run (rewinds, resumes it) copies it to its own tmp_path first.
"""

from pathlib import Path

import pytest


def save_student_and_teacher(model_name: str, root: Path) -> Path:
    """Student (seed 1) and teacher (seed 2) of `model_name`, HF checkpoints in root/student, root/teacher."""
    from train.models import build_model, init_weights, save_hf

    for name, seed in (("student", 1), ("teacher", 2)):
        save_hf(init_weights(build_model(model_name, device="cpu"), seed), root / name)
    return root


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    """Student (seed 1) and teacher (seed 2): tiny-qwen3 HF checkpoints."""
    return save_student_and_teacher("tiny-qwen3", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def qad_four_iterations(tmp_path_factory, models):
    """`python -m train.qad` of `models` in one process, 4 iterations, a checkpoint every 2:
    (its checkpoint.root, the finished job). test_qad.py resumes a copy of it; test_sharded_load.py
    compares the FSDP2 job with it."""
    from tests.integration.test_qad import qad

    root = tmp_path_factory.mktemp("qad_four_iterations")
    return root, qad(root, models, "20260101_000001", "training.train_iters=4", "checkpoint.save_interval=2")


@pytest.fixture(scope="session")
def qad_moe_ep2(tmp_path_factory):
    """tiny-qwen3-moe student and teacher (seeds 1, 2), and `torchrun -m train.qad` of QAD_MOE_ARGS
    under EP 2 x FSDP2 on 2 processes: (the models, its checkpoint.root, the finished job)."""
    from tests.integration.test_qad import QAD_MOE_ARGS, qad

    root = tmp_path_factory.mktemp("qad_moe_ep2")
    models = save_student_and_teacher("tiny-qwen3-moe", root / "models")
    result = qad(root / "two", models, "20260101_000001", *QAD_MOE_ARGS, "parallel.expert_parallel_size=2",
                 "parallel.data_parallel=fsdp", procs=2)
    return models, root / "two", result


@pytest.fixture(scope="session")
def shared_launch(request, tmp_path_factory):
    """(worker, processes) -> {case: "ok" | traceback} of that worker's cases. The first call for a
    process count starts one torchrun (shared_worker.py) for the cases of every worker that the
    session's selected tests name in their module's SHARED_LAUNCHES ({test function: (worker,
    processes, cases)}): N processes start up once per session, not once per file, and a file run
    alone launches only its own cases."""
    from tests.integration.test_parallel import run_worker

    launches = {}

    def results(worker: str, processes: int) -> dict[str, str]:
        if processes not in launches:
            wanted = {}  # worker -> its cases, in order, once each
            for item in request.session.items:
                shared = getattr(getattr(item, "module", None), "SHARED_LAUNCHES", {})
                name, count, cases = shared.get(getattr(item, "originalname", None), (None, None, ()))
                if count == processes:
                    wanted.setdefault(name, {}).update(dict.fromkeys(cases))
            names = [f"{name}:{case}" for name, cases in wanted.items() for case in cases]
            launches[processes] = run_worker(tmp_path_factory.mktemp(f"shared_launch_{processes}"), names,
                                             "shared_worker.py", processes=processes, timeout=900)
        return {name.split(":", 1)[1]: result for name, result in launches[processes].items()
                if name.split(":", 1)[0] == worker}
    return results


@pytest.fixture(scope="session")
def qad_run(tmp_path_factory) -> Path:
    """The run directory of two QAD iterations (nvfp4, lr 1e-3) of a random tiny-qwen3 student
    (seed 1) from a teacher (seed 2); both directories hold the same local tokenizer, trained on
    docs/examples/downstream's task items too (every word has tokens). test_export.py and
    test_downstream.py read it (a test that changes it works on a copy)."""
    import os
    import subprocess
    import sys

    from tests.fixtures.synthetic_data import build_tokenizer, generate_documents

    repo = Path(__file__).resolve().parents[2]
    root = save_student_and_teacher("tiny-qwen3", tmp_path_factory.mktemp("qad_run"))
    texts = generate_documents(50, 40) + (repo / "docs/examples/downstream/tiny_mc.jsonl").read_text().splitlines()
    for name in ("student", "teacher"):
        build_tokenizer(str(root / name), texts, 400)
    command = [sys.executable, "-m", "train.qad", f"checkpoint.root={root}", "model.name=tiny-qwen3",
               f"model.hf_checkpoint={root / 'student'}", "distill.teacher_model=tiny-qwen3",
               f"distill.teacher_checkpoint={root / 'teacher'}", "data.source=synthetic",
               "data.dataset_name=synthetic", "data.seq_length=32", "training.train_iters=2",
               "checkpoint.save_interval=2", "optim.lr=1e-3", "quant.calibration_batches=2",
               "logging.tensorboard=false"]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo),
                                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "tiny-qwen3-Teacher-tiny-qwen3-Data-synthetic-lr0.001"
