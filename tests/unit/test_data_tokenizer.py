"""python -m pytest tests/unit/test_data_tokenizer.py  (`python -m train.data corpus` and `tokenizer`)"""

import json

import pytest

from train.data.cli import main

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "Return the sum of a and b.\n\n>>> add(1, 2)\n3",
         "Unicode survives byte-level BPE: naïve café, 東京, emoji 🙂."] * 20


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizer")
    corpus = write_jsonl(root / "corpus.jsonl", [{"text": text} for text in TEXTS])
    assert main(["tokenizer", "--input", str(corpus), "--vocab-size", "400", "--output", str(root / "tok")]) == 0
    return root / "tok"


def test_tokenizer_round_trips_any_text_and_has_the_special_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert 300 < len(tokenizer) <= 400 and tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|endoftext|>"
    for text in [*TEXTS[:3], "unseen words: zyxwvut, Ω≈ç√ and tabs\tand\nnewlines"]:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
    assert len(tokenizer("The quick brown fox")["input_ids"]) < len("The quick brown fox") / 2  # merges learned


def test_chat_template_renders_chatml(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sum 1 and 2?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSum 1 and 2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # one token each, not split into bytes


def test_corpus_writes_stdlib_docstrings(tmp_path, capsys):
    assert main(["corpus", "--output", str(tmp_path / "c.jsonl"), "--documents", "30"]) == 0
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert len(records) == 30 and all(len(record["text"]) > 200 for record in records)
    assert "30 documents" in capsys.readouterr().out


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\nnot json\n', "c.jsonl:2: not a JSON object with a 'text' string"),
    ('{"body": "no text key"}\n', "c.jsonl:1: not a JSON object with a 'text' string"),
    ("", "c.jsonl: no records"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    assert main(["tokenizer", "--input", str(tmp_path / "c.jsonl"), "--vocab-size", "300",
                 "--output", str(tmp_path / "tok")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / message}"
    assert not (tmp_path / "tok").exists()


def test_too_small_a_vocabulary_is_refused(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "abc"}])
    assert main(["tokenizer", "--input", str(corpus), "--vocab-size", "100", "--output", str(tmp_path / "t")]) == 2
    assert "--vocab-size 100: a byte-level BPE needs at least 259" in capsys.readouterr().err
