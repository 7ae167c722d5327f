"""Required dependencies import, and no test skips itself when one is missing:
`python -m pytest -q tests/unit/test_required_dependencies.py`.

A required package (pyproject.toml's dependencies) that fails to import must fail the tests,
not turn them into skips: a module-level importorskip of modelopt silently
skipped every quantization test when modelopt broke. Optional packages (flash-attn,
flash-linear-attention, causal-conv1d: the `gpu` extra) may still be skipped, with a reason.
"""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# import names of the required packages the tests use (pyproject.toml: dependencies)
REQUIRED = ["torch", "transformers", "datasets", "tokenizers", "safetensors", "tensorboard", "hydra",
            "omegaconf", "submitit", "modelopt.torch.quantization", "peft", "numpy", "regex", "matplotlib"]


@pytest.mark.parametrize("module", REQUIRED)
def test_required_dependency_imports(module):
    importlib.import_module(module)


def test_no_test_skips_on_a_required_dependency():
    top_level = {name.split(".")[0] for name in REQUIRED}
    skips = re.compile(r"importorskip\(\s*[\"']([\w.]+)[\"']")
    offenders = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for match in skips.finditer(path.read_text()):
            if match.group(1).split(".")[0] in top_level:
                offenders.append(f"{path.relative_to(ROOT)}: importorskip({match.group(1)!r})")
    assert offenders == []
