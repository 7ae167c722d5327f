"""The word cache gives the tokenizer's own ids (train/data/word_cache.py): pytest tests/unit/test_word_cache.py

Each supported tokenizer structure is built for real with the tokenizers library and its
encode_batch_fast is the reference: every character of the cached ranges in many contexts,
random strings, and the texts that must fall back to the tokenizer.
"""

import random

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from tests.fixtures.synthetic_data import generate_documents
from train.data import word_cache
from train.data.word_cache import CACHED_RANGES, WordCacheEncoder

# The Split regexes of Qwen2/Qwen3's and Llama 3's tokenizer.json.
QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
ADDED = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CACHED_CHARACTERS = [chr(code) for low, high in CACHED_RANGES for code in range(low, high + 1)]


def split_then_byte_level(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(pattern), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


STRUCTURES = {
    "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False), None),
    "qwen3": (split_then_byte_level(QWEN_SPLIT), normalizers.NFC()),
    "llama3": (split_then_byte_level(LLAMA3_SPLIT), None),
}


def train_tokenizer(pre_tokenizer, normalizer=None, **bpe) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(**bpe))
    tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = generate_documents(400, 80, seed=3) + ["".join(rng.choices(CACHED_CHARACTERS, k=200)) for _ in range(50)]
    trainer = trainers.BpeTrainer(
        vocab_size=1500, special_tokens=ADDED, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


@pytest.fixture(scope="module", params=sorted(STRUCTURES))
def tokenizer(request):
    return train_tokenizer(*STRUCTURES[request.param])


def reference(tokenizer, texts):
    return [encoding.ids for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def test_every_cached_character_in_many_contexts(tokenizer):
    encoder = WordCacheEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    contexts = ["{c}", "a{c}", "{c}a", " {c}", "{c} ", "  {c}  b", "1{c}23", "{c}{c}{c}", "'{c}", "{c}'s", "x'{c}",
                "\n{c}\n", "\r\n{c}", "{c}\t\t", "A {c} B", "{c}4 x", "ab{c}cd {c}ef"]  # fmt: skip
    texts = [context.format(c=c) for c in CACHED_CHARACTERS for context in contexts]
    cached = [text for text in texts if encoder._cached_ids(text) is not None]
    assert len(cached) > 0.9 * len(texts)  # the rest are non-NFC texts under the NFC normalizer
    assert encoder.encode_batch(texts) == reference(tokenizer, texts)


def test_random_strings_and_running_text(tokenizer):
    encoder = WordCacheEncoder.for_tokenizer(tokenizer)
    rng = random.Random(1)
    alphabet = CACHED_CHARACTERS + list("the cat's  sat\n\n 2024 'S  ") * 40
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 60))) for _ in range(5000)]
    texts += generate_documents(300, 60, seed=4) + ["", " ", "\n"]
    assert encoder.encode_batch(texts) == reference(tokenizer, texts)
    assert len(encoder.cache) > 100


def test_texts_the_tokenizer_must_encode(tokenizer):
    encoder = WordCacheEncoder.for_tokenizer(tokenizer)
    fall_back = [
        "日本語のテキスト and English",  # outside the cached ranges
        "emoji 🙂 here",
        "Ωmega",  # Greek: outside the ranges too (U+03A9)
        "hello<|endoftext|>world",  # an added token
        "a <|im_start|>user\nhi<|im_end|>",
    ]
    for text in fall_back:
        assert encoder._cached_ids(text) is None, text
    assert encoder._cached_ids("plain English, “quoted” — done…") is not None
    assert encoder.encode_batch(fall_back + ["plain"]) == reference(tokenizer, fall_back + ["plain"])


def test_nfc_normalizer_sends_unnormalized_text_to_the_tokenizer():
    tokenizer = train_tokenizer(*STRUCTURES["qwen3"])
    encoder = WordCacheEncoder.for_tokenizer(tokenizer)
    decomposed = "cafe\u0301 au lait"  # e + combining acute: NFC makes it é
    assert encoder._cached_ids(decomposed) is None
    assert encoder._cached_ids("caf\u00e9 au lait") is not None
    assert encoder.encode_batch([decomposed]) == reference(tokenizer, [decomposed])


@pytest.mark.parametrize(
    "build",
    [
        lambda: train_tokenizer(pre_tokenizers.Metaspace()),  # SentencePiece-style (Llama 2)
        lambda: train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=True)),
        lambda: train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), normalizers.Lowercase()),
        lambda: train_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False), dropout=0.1),
        lambda: train_tokenizer(split_then_byte_level(r"(\p{L}+)|\s+|.")),  # findall would return the group
        lambda: train_tokenizer(pre_tokenizers.Sequence([pre_tokenizers.Digits(), pre_tokenizers.ByteLevel()])),
    ],
    ids=["metaspace", "prefix-space", "lowercase", "dropout", "capturing-group", "digits-then-byte-level"],
)
def test_structures_not_reproduced_get_no_cache(build):
    assert WordCacheEncoder.for_tokenizer(build()) is None


def test_text_the_split_regex_leaves_gaps_in_goes_to_the_tokenizer():
    tokenizer = train_tokenizer(split_then_byte_level(r"\p{L}+| "))  # digits and punctuation are gaps
    encoder = WordCacheEncoder.for_tokenizer(tokenizer)
    assert encoder is not None
    assert encoder._cached_ids("only words here") is not None
    texts = ["abc 123, def", "x.y"]
    assert [encoder._cached_ids(text) for text in texts] == [None, None]
    assert encoder.encode_batch(texts) == reference(tokenizer, texts)


def test_a_split_that_differs_is_caught_by_the_probes(monkeypatch):
    tokenizer = train_tokenizer(*STRUCTURES["gpt2"])
    # Without the lookahead alternative, "a  b" splits as "a", "  ", "b" instead of "a", " ", " b".
    monkeypatch.setattr(word_cache, "GPT2_SPLIT", r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+""")
    assert WordCacheEncoder.for_tokenizer(tokenizer) is None


def test_a_full_cache_starts_over_with_the_same_ids(monkeypatch):
    tokenizer = train_tokenizer(*STRUCTURES["gpt2"])
    monkeypatch.setattr(word_cache, "MAX_CACHED_PIECES", 50)
    encoder = WordCacheEncoder.for_tokenizer(tokenizer)
    texts = generate_documents(200, 60, seed=5)
    assert encoder.encode_batch(texts) == reference(tokenizer, texts)
    assert len(encoder.cache) <= 50 + max(len(encoder.split(text)) for text in texts)


def test_byte_level_alphabet_is_the_tokenizers_one():
    alphabet = word_cache.byte_level_alphabet()
    assert len(set(alphabet)) == 256
    assert sorted(alphabet) == sorted(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet[ord(" ")] == "Ġ" and alphabet[ord("\n")] == "Ċ" and alphabet[ord("a")] == "a"
