"""Preprocessing end to end (jsonl/json/parquet, workers, validation, chat loss masks, atomicity): pytest tests/integration/test_preprocess.py"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

from tests.fixtures.synthetic_data import build_tokenizer, generate_documents
from train.config import PreprocessConfig
from train.data import malloc, readers, tokenize_worker
from train.data.chat import RenderOptions
from train.data.errors import DataError
from train.data.gpt_dataset import loss_mask_prefix
from train.data.indexed import IndexedDataset
from train.data.preprocess import preprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    return build_tokenizer(directory, generate_documents(300, 60, seed=1), 700)


@pytest.fixture(scope="module")
def texts():
    documents = generate_documents(230, 40, seed=2)
    documents[5] = ""  # empty documents are skipped and counted
    documents[77] = ""
    return documents


def write_jsonl(path, records):
    with open(path, "w") as stream:
        for record in records:
            stream.write(json.dumps(record) + "\n")
    return str(path)


def make_config(**overrides):
    config = PreprocessConfig(input="", output_prefix="", tokenizer="")
    for key, value in {"batch_size": 16, "workers": 1, **overrides}.items():
        setattr(config, key, value)
    return config


def test_text_documents_round_trip(tmp_path, tokenizer_dir, texts):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    summary = preprocess(make_config(input=source, tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "fw")))
    dataset = IndexedDataset(str(tmp_path / "fw_text_document"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    kept = [t for t in texts if t]
    assert len(dataset) == summary.documents["train"] == len(kept)
    assert summary.empty_skipped == 2 and summary.records_read == len(texts)
    assert dataset.dtype == np.uint16
    assert list(dataset.document_indices) == list(range(len(kept) + 1))
    for index in (0, 4, 5, 100, len(kept) - 1):
        expected = tokenizer(kept[index], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        np.testing.assert_array_equal(dataset[index], expected)
    assert tokenizer.decode(dataset[3][:-1]) == kept[3]
    assert summary.tokens["train"] == dataset.token_count
    assert not os.path.exists(str(tmp_path / "fw_text_document_loss_mask.idx"))


def test_two_workers_match_one_and_max_docs(tmp_path, tokenizer_dir, texts):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    outputs = []
    for workers in (1, 2):
        prefix = str(tmp_path / f"w{workers}")
        preprocess(make_config(input=source, tokenizer=tokenizer_dir, output_prefix=prefix, workers=workers, max_docs=150, batch_size=7))
        outputs.append(prefix + "_text_document")
    for suffix in (".bin", ".idx"):
        assert open(outputs[0] + suffix, "rb").read() == open(outputs[1] + suffix, "rb").read()
    assert len(IndexedDataset(outputs[0])) == 150 - 2


def test_word_cache_writes_the_same_files_as_the_tokenizer(tmp_path, tokenizer_dir, texts):
    mixed = texts + ["naïve café — “quoted”…", "日本語 and English", "an <|endoftext|> inside", "tab\tand  spaces\r\n"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in mixed])
    prefixes, cached = {}, {}
    for word_cache in (True, False):
        prefixes[word_cache] = str(tmp_path / f"cache_{word_cache}")
        config = make_config(input=source, tokenizer=tokenizer_dir, output_prefix=prefixes[word_cache], word_cache=word_cache)
        cached[word_cache] = preprocess(config).word_cached
    # All but the Japanese text and the one holding an added token (empty ones included).
    assert cached == {True: len(mixed) - 2, False: 0}
    for suffix in ("_text_document.bin", "_text_document.idx"):
        assert open(prefixes[True] + suffix, "rb").read() == open(prefixes[False] + suffix, "rb").read()
    tokenize_worker.init_worker(tokenizer_dir, RenderOptions(), True, "<u2", False)
    assert tokenize_worker._state["word_cache"] is not None  # this byte-level BPE takes the cached path
    tokenize_worker.init_worker(tokenizer_dir, RenderOptions(), True, "<u2", False, word_cache=False)
    assert tokenize_worker._state["word_cache"] is None


def test_validation_fraction_splits_documents(tmp_path, tokenizer_dir, texts):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    summary = preprocess(make_config(input=source, tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "v"), validation_fraction=0.2))
    train = IndexedDataset(str(tmp_path / "v_text_document"))
    valid = IndexedDataset(str(tmp_path / "v_valid_text_document"))
    assert len(train) + len(valid) == len(texts) - 2
    assert 0.08 < len(valid) / (len(train) + len(valid)) < 0.35
    assert summary.documents == {"train": len(train), "valid": len(valid)}
    train_set = {tuple(train[i]) for i in range(len(train))}
    assert not any(tuple(valid[i]) in train_set for i in range(len(valid)))


def test_datablend_option_writes_a_blend_of_the_outputs(tmp_path, tokenizer_dir, texts):
    """datablend=PATH: the blend a job reads (DATACACHE_DIR/datablend_<name>.json), prefixes relative to it."""
    from train.data.blend import load_blend

    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    cache = tmp_path / "cache"
    summary = preprocess(make_config(input=source, tokenizer=tokenizer_dir, output_prefix=str(cache / "docs"),
                                     validation_fraction=0.2, datablend=str(cache / "datablend_docs.json")))
    assert json.loads((cache / "datablend_docs.json").read_text()) == {
        "train": [1.0, "docs_text_document"], "valid": [1.0, "docs_valid_text_document"]}
    blend = load_blend(str(cache / "datablend_docs.json"))  # checks the pairs exist
    assert blend.prefixes("train") == [str(cache / "docs_text_document")]
    assert str(cache / "datablend_docs.json") in summary.outputs


@pytest.mark.parametrize("kind", ["json_array", "parquet"])
def test_other_local_formats(tmp_path, tokenizer_dir, texts, kind):
    records = [{"body": t} for t in texts[:40]]
    if kind == "parquet":
        import pyarrow
        import pyarrow.parquet

        source = str(tmp_path / "in.parquet")
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(records), source)
    else:
        source = str(tmp_path / "in.json")
        (tmp_path / "in.json").write_text(json.dumps(records))
    preprocess(make_config(input=source, tokenizer=tokenizer_dir, output_prefix=str(tmp_path / kind), text_field="body"))
    assert len(IndexedDataset(str(tmp_path / f"{kind}_text_document"))) == 40 - 1  # texts[5] is empty


CONVERSATIONS = [
    {"messages": [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": f"<think>ponder {n}</think>Answer {n}."}]}
    for n in range(30)
] + [{"instruction": "Say hi.", "input": "", "output": "Hi there."}]


@pytest.mark.parametrize("keep_cot", [False, True])
def test_chat_records_get_a_loss_mask(tmp_path, tokenizer_dir, keep_cot):
    source = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    preprocess(make_config(input=source, tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "c"), chat=True, keep_cot=keep_cot))
    tokens = IndexedDataset(str(tmp_path / "c_text_document"))
    mask = IndexedDataset(loss_mask_prefix(str(tmp_path / "c_text_document")))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert mask.dtype == np.uint8 and len(mask) == len(tokens) == len(CONVERSATIONS)
    np.testing.assert_array_equal(mask.sequence_lengths, tokens.sequence_lengths)
    for index in (0, 17):
        answer = tokenizer.decode(tokens[index][mask[index] == 1])
        prompt = tokenizer.decode(tokens[index][mask[index] == 0])
        reasoning = f"<think>ponder {index}</think>" if keep_cot else ""
        assert answer == f"{reasoning}Answer {index}.<|im_end|>\n<|endoftext|>"
        assert prompt == f"<|im_start|>user\nQuestion {index}?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokens[30][mask[30] == 1]) == "Hi there.<|im_end|>\n<|endoftext|>"


def test_failed_run_leaves_no_files(tmp_path, tokenizer_dir, texts):
    source = tmp_path / "broken.jsonl"
    write_jsonl(source, [{"text": t} for t in texts[:50]])
    with open(source, "a") as stream:
        stream.write("{not json\n")
    with pytest.raises(DataError, match="not valid JSON.*not json"):
        preprocess(make_config(input=str(source), tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "out" / "b"), workers=2))
    assert os.listdir(tmp_path / "out") == []


def test_killed_run_leaves_no_final_named_files(tmp_path, tokenizer_dir, texts, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    original = readers._json_records

    def stalling_records(path):  # 6 batches of 16, then the input stalls until the kill
        for number, line in enumerate(original(path)):
            if number == 96:
                time.sleep(120)
            yield line

    monkeypatch.setattr(readers, "_json_records", stalling_records)  # inherited by the fork
    out = tmp_path / "out"
    config = make_config(input=source, tokenizer=tokenizer_dir, output_prefix=str(out / "k"), workers=2)
    run = multiprocessing.get_context("fork").Process(target=preprocess, args=(config,))
    run.start()
    deadline = time.monotonic() + 60

    def written():  # the temporary .bin holds the first batches' tokens
        names = os.listdir(out) if out.exists() else []
        return [n for n in names if ".bin.tmp-" in n and os.path.getsize(out / n) > 0]

    while not written() and time.monotonic() < deadline and run.is_alive():
        time.sleep(0.05)
    assert written(), "the run never wrote tokens"
    os.kill(run.pid, signal.SIGKILL)
    run.join()
    names = os.listdir(out)
    assert names and all(".tmp-" in name for name in names), names  # no final name, no .idx


def _tokenizer_environment():
    return os.environ.get("TOKENIZERS_PARALLELISM"), os.environ.get("RAYON_NUM_THREADS")


@pytest.mark.parametrize("threads, expected", [(1, ("false", None)), (4, (None, "4"))])
def test_workers_size_the_tokenizer_thread_pool(threads, expected, monkeypatch):
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    with multiprocessing.get_context("fork").Pool(1, tokenize_worker.start_worker, (threads,)) as pool:
        assert pool.apply(_tokenizer_environment) == expected


def test_pool_workers_tokenize_on_their_own_thread(tokenizer_dir, texts, monkeypatch):
    lines = [json.dumps({"text": t}).encode() for t in texts[:40]]
    tokenize_worker.init_worker(tokenizer_dir, RenderOptions(), True, "<u2", False)
    expected = tokenize_worker.tokenize_batch(lines)
    original = tokenize_worker.tokenize_batch
    monkeypatch.setattr(tokenize_worker, "tokenize_batch", lambda items: (original(items), threading.current_thread().name))
    with multiprocessing.get_context("fork").Pool(1, tokenize_worker.start_worker, (1,)) as pool:
        result, thread = pool.apply(tokenize_worker.tokenize_batch_in_worker, (lines,))
    assert thread.startswith("tokenize")  # not the worker's main thread (see tokenize_worker)
    np.testing.assert_array_equal(result.tokens, expected.tokens)
    np.testing.assert_array_equal(result.lengths, expected.lengths)


def test_bad_inputs_are_data_errors(tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no records"):
        preprocess(make_config(input=str(empty), tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "e")))
    blanks = write_jsonl(tmp_path / "blanks.jsonl", [{"text": ""}] * 3)
    with pytest.raises(DataError, match="empty"):
        preprocess(make_config(input=blanks, tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "e")))
    wrong_key = write_jsonl(tmp_path / "wrong.jsonl", [{"content": "x"}])
    with pytest.raises(DataError, match="content"):
        preprocess(make_config(input=wrong_key, tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "e")))
    with pytest.raises(DataError, match="tokenizer"):
        preprocess(make_config(input=blanks, tokenizer=str(tmp_path / "no-tokenizer"), output_prefix=str(tmp_path / "e")))
    assert not [name for name in os.listdir(tmp_path) if name.startswith("e_")]


def test_hub_dataset_missing_offline_is_a_data_error(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot be loaded"):
        preprocess(make_config(input="nobody/no-such-dataset", tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "h")))


@pytest.mark.slow
def test_cli_is_hydra_style_and_reports_errors(tmp_path, tokenizer_dir, texts):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:20]])
    run = lambda *args: subprocess.run([sys.executable, "-m", "train.preprocess", *args], capture_output=True, text=True, cwd=REPO)  # noqa: E731
    ok = run(f"input={source}", f"tokenizer={tokenizer_dir}", f"output_prefix={tmp_path}/cli", "workers=1", "append_eod=false")
    assert ok.returncode == 0, ok.stderr
    assert "documents:" in ok.stdout and "19 train" in ok.stdout
    assert IndexedDataset(f"{tmp_path}/cli_text_document").token_count > 0
    bad = run(f"input={tmp_path}/missing.jsonl", f"tokenizer={tokenizer_dir}", f"output_prefix={tmp_path}/x")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def summary_line(stdout: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith(key + ":"))


@pytest.mark.slow
def test_cli_preloads_a_faster_malloc_with_identical_output(tmp_path, tokenizer_dir, texts):
    library = malloc.resolve("auto")
    if library is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs libmimalloc2.0 (make install), but no malloc library was found")
        pytest.skip("no mimalloc / tcmalloc / jemalloc installed (apt-get install libmimalloc2.0)")
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    environment = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}

    def run(*args):
        command = [sys.executable, "-m", "train.preprocess", f"input={source}", f"tokenizer={tokenizer_dir}", *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment)

    outputs = {}
    for choice in ("auto", "system"):
        result = run(f"output_prefix={tmp_path}/{choice}", f"malloc={choice}", "workers=2")
        assert result.returncode == 0, result.stderr
        outputs[choice] = summary_line(result.stdout, "malloc")
        assert result.stdout.count("documents:") == 1  # the re-executed run printed once
    assert os.path.basename(outputs["auto"]).startswith(library.split(".so")[0]) and outputs["system"] == "glibc"
    for suffix in ("_text_document.bin", "_text_document.idx"):
        assert open(f"{tmp_path}/auto{suffix}", "rb").read() == open(f"{tmp_path}/system{suffix}", "rb").read()
    # A file the loader refuses to preload: the re-executed run goes on with glibc (no loop).
    not_a_library = tmp_path / "libnot.so"
    not_a_library.write_text("not an ELF file")
    refused = run(f"output_prefix={tmp_path}/refused", f"malloc={not_a_library}")
    assert refused.returncode == 0, refused.stderr
    assert summary_line(refused.stdout, "malloc") == "glibc"
    bad = run(f"output_prefix={tmp_path}/bad", "malloc=jemaloc")
    assert bad.returncode == 2 and "malloc='jemaloc'" in bad.stderr and "Traceback" not in bad.stderr
    assert not any(name.startswith("bad") for name in os.listdir(tmp_path))
