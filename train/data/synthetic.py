"""Small generated datasets for tests and benchmarks (no downloads)."""

import numpy as np

from train.data.indexed_writer import IndexedDatasetWriter, commit_all


def write_documents(prefix: str, documents: list, dtype=np.uint16) -> str:
    """Write each document (a sequence of ids) as one sequence of a committed pair."""
    writer = IndexedDatasetWriter(prefix, dtype)
    lengths = np.array([len(document) for document in documents], dtype=np.int32)
    flat = np.concatenate([np.asarray(d) for d in documents]) if documents else np.zeros(0)
    writer.add_documents(flat, lengths)
    writer.finish()
    commit_all([writer])
    return prefix


def write_random_documents(
    prefix: str, document_count: int, mean_length: int, vocab_size: int, eod_id: int, seed: int
) -> str:
    """Documents of geometric-ish random lengths, random ids in [0, vocab) ending in eod_id."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, rng.exponential(mean_length, document_count).astype(np.int32))
    flat = rng.integers(0, vocab_size, size=int(lengths.sum()), dtype=np.int64)
    ends = np.cumsum(lengths) - 1
    flat[flat == eod_id] = (eod_id + 1) % vocab_size  # eod only at document ends
    flat[ends] = eod_id
    writer = IndexedDatasetWriter(prefix, np.uint16 if vocab_size < 65500 else np.int32)
    writer.add_documents(flat, lengths)
    writer.finish()
    commit_all([writer])
    return prefix


# A simple chat template for tests: "<|im_start|>role\ncontent<|im_end|>\n" per turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]


def make_vocabulary(word_count: int, seed: int = 0) -> list[str]:
    """Pseudo-words of 1-4 syllables: a stand-in for a language's vocabulary."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(SYLLABLES), (word_count, 4))
    sizes = rng.integers(1, 5, word_count)
    return ["".join(SYLLABLES[i] for i in row[:size]) for row, size in zip(picks, sizes)]


def generate_documents(document_count: int, mean_words: int, seed: int = 0, vocabulary: list[str] | None = None) -> list[str]:
    """Zipf-distributed words with punctuation and paragraphs, like running text."""
    rng = np.random.default_rng(seed)
    vocabulary = vocabulary or make_vocabulary(20000, seed)
    ranks = np.minimum(rng.zipf(1.2, size=document_count * mean_words * 2), len(vocabulary)) - 1
    documents, position = [], 0
    for length in np.maximum(1, rng.poisson(mean_words, document_count)):
        words = [vocabulary[r] for r in ranks[position : position + length]]
        position = (position + length) % (len(ranks) - 2 * mean_words - 10)
        for cut in range(7, len(words), 9):
            words[cut] += "." if cut % 5 else ".\n\n"
        words[0] = words[0].capitalize()
        documents.append(" ".join(words) + ".")
    return documents


def build_tokenizer(directory: str, texts: list[str], vocab_size: int = 1000) -> str:
    """A byte-level BPE trained on `texts`, saved as an HF tokenizer dir with eos + chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(directory)
    return directory
