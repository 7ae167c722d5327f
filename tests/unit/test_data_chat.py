"""Chat/SFT rendering, reasoning variants and assistant spans: pytest tests/unit/test_data_chat.py"""

import pytest
from transformers import AutoTokenizer

from tests.fixtures.synthetic_data import build_tokenizer, generate_documents
from train.data.chat import RenderOptions, render_record, variant_name
from train.data.errors import DataError

CONVERSATION = {
    "messages": [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "<think>Two and two make four.</think>\nIt is four."},
        {"role": "user", "content": "And three?"},
        {"role": "assistant", "content": "Five.", "reasoning_content": "Two plus three."},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tokenizer"))
    return AutoTokenizer.from_pretrained(build_tokenizer(directory, generate_documents(100, 50), 600))


def spans_text(text, spans):
    return [text[start:end] for start, end in spans]


def test_variant_names():
    assert [variant_name("nemotron", cot, chat) for cot in (False, True) for chat in (False, True)] == [
        "nemotron", "nemotron_chat", "nemotron_cot", "nemotron_cot_chat"
    ]


def test_plain_with_and_without_reasoning(tokenizer):
    text, spans = render_record(CONVERSATION, RenderOptions(keep_cot=False), tokenizer)
    assert "<think>" not in text and "Two plus three" not in text
    assert spans_text(text, spans) == ["It is four.", "Five."]
    text, spans = render_record(CONVERSATION, RenderOptions(keep_cot=True), tokenizer)
    assert spans_text(text, spans)[0] == "<think>Two and two make four.</think>\nIt is four."
    assert spans_text(text, spans)[1] == "<think>\nTwo plus three.\n</think>\n\nFive."


def test_chat_template_spans_cover_answers_and_end_of_turn(tokenizer):
    text, spans = render_record(CONVERSATION, RenderOptions(chat=True, keep_cot=False), tokenizer)
    assert text.startswith("<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n")
    assert spans_text(text, spans) == ["It is four.<|im_end|>\n", "Five.<|im_end|>\n"]


def test_alpaca_record(tokenizer):
    record = {"instruction": "Name a colour.", "input": "Not red.", "output": "Blue."}
    text, spans = render_record(record, RenderOptions(chat=True), tokenizer)
    assert "Name a colour.\n\nNot red." in text
    assert spans_text(text, spans) == ["Blue.<|im_end|>\n"]


def test_text_record_and_unknown_keys(tokenizer):
    assert render_record({"body": "hello"}, RenderOptions(text_field="body"), tokenizer) == ("hello", None)
    with pytest.raises(DataError, match="keys"):
        render_record({"body": "hello"}, RenderOptions(), tokenizer)
