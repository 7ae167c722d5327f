"""`python -m train.data inspect|blend` and datablend recipes: pytest tests/unit/test_data_cli.py"""

import json
import subprocess
import sys

import pytest

from tests.fixtures.synthetic_data import write_documents
from train.data.blend import load_blend, train_samples_for_blend
from train.data.cli import main


@pytest.fixture
def data_dir(tmp_path):
    write_documents(str(tmp_path / "openscience_text_document"), [[1] * 400])
    write_documents(str(tmp_path / "v1_math_text_document"), [[2] * 300, [2] * 300])
    write_documents(str(tmp_path / "v1_code_text_document"), [[3] * 200])
    write_documents(str(tmp_path / "v1_valid_text_document"), [[3] * 50])
    write_documents(str(tmp_path / "v2_text_document"), [[4] * 1000])
    return tmp_path


RECIPE = """
name: combined_cot_chat
sources:
  openscience:
    weight: 0.2
    prefixes: [openscience_text_document]
  nemotron_v1:
    weight: {train: 0.5, valid: 1.0}
    prefixes:
      train: [v1_math_text_document, v1_code_text_document]
      valid: [v1_valid_text_document]
  nemotron_v2:
    weight: {train: 0.3}
    prefixes: [v2_text_document]
"""


def test_blend_recipe_writes_megatron_blend(data_dir, capsys):
    (data_dir / "recipe.yaml").write_text(RECIPE)
    out = data_dir / "cache"
    assert main(["blend", "--recipe", str(data_dir / "recipe.yaml"), "--out", str(out), "--seq-length", "100"]) == 0
    printed = capsys.readouterr().out
    blend = load_blend(str(out / "datablend_combined_cot_chat.json"))
    train = {prefix.rsplit("/", 1)[1]: weight for weight, prefix in blend.splits["train"]}
    assert train["openscience_text_document"] == pytest.approx(0.2)
    assert train["v1_math_text_document"] == pytest.approx(0.5 * 600 / 800)
    assert train["v1_code_text_document"] == pytest.approx(0.5 * 200 / 800)
    assert train["v2_text_document"] == pytest.approx(0.3)
    # valid: openscience (0.2) and nemotron_v1 (1.0), normalized
    valid = {prefix.rsplit("/", 1)[1]: weight for weight, prefix in blend.splits["valid"]}
    assert valid == pytest.approx({"openscience_text_document": 0.2 / 1.2, "v1_valid_text_document": 1.0 / 1.2})
    # a plain prefix list means every split: only openscience has a test split
    assert [prefix.rsplit("/", 1)[1] for prefix in blend.prefixes("test")] == ["openscience_text_document"]
    # the printed table has per-source and per-split sample counts
    assert "nemotron_v1" in printed and "(all)" in printed
    assert train_samples_for_blend(str(out / "datablend_combined_cot_chat.json"), 100) == 4 + 3 + 3 + 2 + 10


def test_blend_recipe_with_missing_prefix(data_dir, capsys):
    (data_dir / "recipe.yaml").write_text(RECIPE.replace("v2_text_document", "absent_text_document"))
    assert main(["blend", "--recipe", str(data_dir / "recipe.yaml"), "--out", str(data_dir)]) == 2
    assert "absent_text_document" in capsys.readouterr().err


def test_inspect_prints_header_and_counts(data_dir, capsys):
    assert main(["inspect", str(data_dir / "v1_math_text_document"), "--vocab-size", "10"]) == 0
    printed = capsys.readouterr().out
    assert "dtype code 8 (uint16)" in printed and "sequences:        2" in printed
    assert "tokens:           600" in printed
    assert main(["inspect", str(data_dir / "v1_math_text_document"), "--vocab-size", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_module_entrypoint_exit_code(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train.data", "inspect", str(tmp_path / "absent")], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
