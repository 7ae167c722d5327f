"""A byte-level BPE tokenizer trained on a JSONL corpus, saved as an HF tokenizer directory.

    python -m train.data tokenizer --input X.jsonl --vocab-size N --output DIR [--text-field text]

The directory (tokenizer.json, tokenizer_config.json) loads with transformers' AutoTokenizer and
train.preprocess. Special tokens: <|endoftext|> (eos, pad: the EOD between documents) and
<|im_start|> <|im_end|> of the ChatML chat template it carries, so chat/SFT preprocessing and
fine-tuning's validate mode can render conversations. Byte-level: any text encodes, no unknown token.
"""

import json
from pathlib import Path

from train.data.errors import DataError

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
# ChatML, as Qwen's: "<|im_start|>role\ncontent<|im_end|>\n" per turn, then the assistant's prompt
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def read_texts(path: str | Path, text_field: str) -> list[str]:
    """The `text_field` strings of a JSONL file; DataError names the file and line of a bad record."""
    texts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                texts.append(json.loads(line)[text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: not a JSON object with a {text_field!r} string") from None
    if not texts:
        raise DataError(f"{path}: no records")
    return texts


def build_tokenizer(directory: str | Path, texts: list[str], vocab_size: int) -> str:
    """Trains the BPE on `texts` and saves it with eos, pad and the chat template; returns the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least {256 + len(SPECIAL_TOKENS)}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=EOS)
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(directory))
    return str(directory)
