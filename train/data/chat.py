"""Turn one input record into (text, assistant character spans) for tokenization.

Record kinds (`format: auto` picks by keys):
    text     {"<text_field>": "..."}                       pretraining text, no spans
    messages {"messages": [{"role", "content"}, ...]}       chat / SFT
    alpaca   {"instruction", "input"?, "output"}            becomes user + assistant

Chat and SFT records give the four datablend variants:
    <ds>            plain: message contents joined by blank lines, reasoning stripped
    <ds>_cot        plain, reasoning kept
    <ds>_chat       the tokenizer's chat template, reasoning stripped
    <ds>_cot_chat   the chat template, reasoning kept
Reasoning is a <think>...</think> block inside assistant content, or a message's
`reasoning_content` field (rendered as such a block when kept).

Assistant spans mark the characters whose tokens are answers: with the chat template, an
assistant turn's span runs from the end of the prompt the template renders for it
(add_generation_prompt) to the end of the turn, end-of-turn marker included, so the
model also learns to stop.
"""

import re
from dataclasses import dataclass

from train.data.errors import DataError


@dataclass
class RenderOptions:
    text_field: str = "text"
    format: str = "auto"  # auto | text | messages | alpaca
    chat: bool = False  # apply the tokenizer's chat template
    keep_cot: bool = True
    reasoning_start: str = "<think>"
    reasoning_end: str = "</think>"


def variant_name(dataset_name: str, keep_cot: bool, chat: bool) -> str:
    """Datablend name of a preprocessed variant: <ds>, <ds>_cot, <ds>_chat, <ds>_cot_chat."""
    return dataset_name + ("_cot" if keep_cot else "") + ("_chat" if chat else "")


def record_kind(record: dict, options: RenderOptions) -> str:
    if options.format != "auto":
        return options.format
    if options.text_field in record:
        return "text"
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise DataError(
        f"record has none of {options.text_field!r}, 'messages', 'instruction'+'output' "
        f"(keys: {sorted(record)[:10]}); set text_field or format"
    )


def alpaca_to_messages(record: dict) -> list[dict]:
    prompt = record["instruction"]
    if record.get("input"):
        prompt += "\n\n" + record["input"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def _with_reasoning(message: dict, options: RenderOptions) -> dict:
    """The message with its reasoning kept inline or stripped."""
    if message.get("role") != "assistant":
        return {"role": message["role"], "content": message.get("content") or ""}
    content = message.get("content") or ""
    block = re.compile(
        re.escape(options.reasoning_start) + r".*?" + re.escape(options.reasoning_end) + r"\s*", re.DOTALL
    )
    if not options.keep_cot:
        content = block.sub("", content)
    elif message.get("reasoning_content"):
        reasoning = message["reasoning_content"].strip()
        content = f"{options.reasoning_start}\n{reasoning}\n{options.reasoning_end}\n\n{content}"
    return {"role": "assistant", "content": content}


def _render_plain(messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    text, spans = "", []
    for number, message in enumerate(messages):
        if number:
            text += "\n\n"
        if message["role"] == "assistant":
            spans.append((len(text), len(text) + len(message["content"])))
        text += message["content"]
    return text, spans


def _render_chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    def render(turns, generation_prompt=False):
        return tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )

    text = render(messages)
    spans, cursor = [], 0
    for number, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(messages[:number], True) if number else ""
        through = render(messages[: number + 1])
        if text.startswith(through) and through.startswith(before) and len(before) >= cursor:
            spans.append((len(before), len(through)))
            cursor = len(through)
            continue
        # Templates that rewrite earlier turns (e.g. drop old reasoning) are not prefix
        # stable; fall back to finding the answer text itself.
        start = text.find(message["content"], cursor)
        if start < 0:
            raise DataError("chat template output does not contain an assistant message's content")
        spans.append((start, start + len(message["content"])))
        cursor = start + len(message["content"])
    return text, spans


def render_record(record: dict, options: RenderOptions, tokenizer) -> tuple[str, list[tuple[int, int]] | None]:
    """(text, assistant spans); spans is None for a text record."""
    kind = record_kind(record, options)
    if kind == "text":
        text = record.get(options.text_field)
        if not isinstance(text, str):
            raise DataError(f"field {options.text_field!r} is {type(text).__name__}, not text")
        return text, None
    if kind == "alpaca":
        messages = alpaca_to_messages(record)
    elif kind == "messages":
        messages = record["messages"]
    else:
        raise DataError(f"unknown format {kind!r}; expected auto, text, messages or alpaca")
    messages = [_with_reasoning(message, options) for message in messages]
    if options.chat:
        return _render_chat(messages, tokenizer)
    return _render_plain(messages)
