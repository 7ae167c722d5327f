"""python -m pytest tests/unit/test_launch_inputs.py  (train/launch/inputs.py: the inputs' contents at plan time;
train/launch/torchrun.py: a worker's error record; through the launchers: tests/integration/test_bad_inputs.py)"""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from train.config import JobConfig
from train.launch.inputs import optim_problems, safetensors_problem
from train.launch.torchrun import RECORD_VARIABLE, recorded_failure, write_error_record


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16)}, str(path))
    return path


def test_a_whole_safetensors_file_passes(weights):
    assert safetensors_problem(weights) is None


@pytest.mark.parametrize("cut", [1, 14, 60])
def test_a_truncated_safetensors_file_is_named_with_its_sizes(weights, cut):
    size = weights.stat().st_size
    with weights.open("r+b") as file:
        file.truncate(size - cut)
    problem = safetensors_problem(weights)
    assert str(weights) in problem and f"{size - cut} bytes" in problem


def test_a_safetensors_file_with_extra_bytes_or_a_broken_header_is_refused(weights):
    with weights.open("ab") as file:
        file.write(b"\0" * 4)
    assert "truncated or damaged" in safetensors_problem(weights)
    (header_bytes,) = struct.unpack("<Q", weights.read_bytes()[:8])
    with weights.open("r+b") as file:
        file.seek(8)
        file.write(b"{" * header_bytes)
    assert "not a safetensors file" in safetensors_problem(weights)


@pytest.mark.parametrize("key,value,named", [("lr", -1e-4, "LR=-0.0001 (optim.lr)"), ("min_lr", -1.0, "MIN_LR"),
                                             ("warmup_iters", -1, "WARMUP_ITERS"), ("beta1", 1.0, "optim.beta1=1.0"),
                                             ("eps", -1e-8, "optim.eps"), ("grad_clip", -1.0, "optim.grad_clip")])
def test_impossible_optimizer_values_are_named(key, value, named):
    cfg = JobConfig()
    assert optim_problems(cfg) == []
    setattr(cfg.optim, key, value)
    [problem] = optim_problems(cfg)
    assert named in problem


def test_a_worker_error_record_is_written_only_under_the_wrapper(tmp_path, monkeypatch):
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    monkeypatch.delenv(RECORD_VARIABLE, raising=False)
    assert not write_error_record("error: x", 2) and not path.exists()  # plain torchrun: the worker prints
    monkeypatch.setenv(RECORD_VARIABLE, "1")
    assert write_error_record("error: bad input", 2)
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    crash = tmp_path / "crash.json"  # what torch's @record writes for an exception
    crash.write_text(json.dumps({"message": {"message": "ValueError: x", "extraInfo": {"timestamp": "1"}}}))
    failures = {0: ProcessFailure(0, 10, 1, str(crash)), 1: ProcessFailure(1, 11, 2, str(path))}
    assert recorded_failure(failures) == ("error: bad input", 2)
    assert recorded_failure({0: failures[0]}) is None  # a crash keeps torchrun's report
