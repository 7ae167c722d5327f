"""Datablend JSON loading, validation and sample counts: pytest tests/unit/test_data_blend.py"""

import json
import subprocess
import sys

import pytest

from tests.fixtures.synthetic_data import write_documents
from train.data.blend import load_blend, parse_blend, train_samples_for_blend
from train.data.errors import DataError


@pytest.fixture
def prefixes(tmp_path):
    a = write_documents(str(tmp_path / "a_text_document"), [[1] * 10, [2] * 7])  # 17 tokens
    b = write_documents(str(tmp_path / "b_text_document"), [[3] * 30])  # 30 tokens
    return a, b


def write_blend(tmp_path, data, name="datablend_x.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_loads_per_split_blend(tmp_path, prefixes):
    a, b = prefixes
    path = write_blend(tmp_path, {"train": [0.3, a, 0.7, b], "valid": [a], "test": [1, b]})
    blend = load_blend(path)
    assert blend.splits["train"] == [(0.3, a), (0.7, b)]
    assert blend.splits["valid"] == [(1.0, a)]
    assert blend.prefixes("test") == [b]


def test_relative_prefixes_resolve_beside_the_blend(tmp_path, prefixes):
    path = write_blend(tmp_path, {"train": [1, "a_text_document"]})
    assert load_blend(path).splits["train"][0][1] == prefixes[0]


def test_train_samples_counts_each_prefix(tmp_path, prefixes):
    a, b = prefixes
    path = write_blend(tmp_path, {"train": [0.5, a, 0.5, b], "valid": [b]})
    assert train_samples_for_blend(path, 4) == 17 // 4 + 30 // 4
    assert train_samples_for_blend(path, 100) == 0


def test_missing_prefixes_listed_together(tmp_path, prefixes):
    path = write_blend(tmp_path, {"train": [1, "/nope/x", 1, prefixes[0]], "valid": [1, "/nope/y"]})
    with pytest.raises(DataError) as error:
        load_blend(path)
    assert "/nope/x" in str(error.value) and "/nope/y" in str(error.value)
    assert "2 prefix" in str(error.value)
    assert load_blend(path, check_files=False).prefixes() == ["/nope/x", prefixes[0], "/nope/y"]


@pytest.mark.parametrize("weight", [0, -0.5, float("nan")])
def test_non_positive_weight(tmp_path, prefixes, weight):
    with pytest.raises(DataError, match="positive"):
        parse_blend({"train": [weight, prefixes[0]]}, check_files=False)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"train": [1, "a", 2]}, "3 entries"),
        ({"train": ["a", 1]}, "should be a weight"),
        ({"train": []}, "non-empty"),
        ({"training": [1, "a"]}, "unknown split"),
        ([1, "a"], "JSON object"),
    ],
)
def test_malformed_blends(data, message):
    with pytest.raises(DataError, match=message):
        parse_blend(data, check_files=False)


def test_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_blend(str(bad))
    with pytest.raises(DataError, match="not found"):
        load_blend(str(tmp_path / "absent.json"))


def test_blend_and_indexed_import_without_torch():
    code = "import sys, train.data, train.data.blend, train.data.indexed; train.data.load_blend; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
