"""Plain text to ids faster than the tokenizer, with the same ids: a per-word cache in front of BPE.

A byte-level BPE (GPT-2, Qwen2/3, Llama 3) encodes a text in three steps: split it with the
pre-tokenizer's regex into pieces (" the", " cat", "."), map each piece's UTF-8 bytes to the
byte-level alphabet, run BPE on each piece. Pieces repeat (natural text: tens of thousands
of distinct ones per million), so their ids can be cached; a text then costs one regex pass
(the `regex` module, C) and one dict lookup per piece. The Rust tokenizer's
encode_batch_fast builds an Encoding per text (ids, token strings, offsets, ...) and spends
about 40% of its time in malloc: on the 50 MB benchmark text, single-threaded, 2.9 CPU-s
here against 8.1 for the tokenizer (glibc; 5.7 with mimalloc).

The split is ours, so a text takes this path only where it is known to equal the tokenizer's:
  - the tokenizer has a structure reproduced here (`WordCacheEncoder.for_tokenizer` returns
    None otherwise): normalizer none or NFC; pre-tokenizer ByteLevel with the GPT-2 regex,
    or Split(regex, Isolated) followed by ByteLevel without its regex; BPE without dropout;
    no truncation or padding;
  - every character lies in U+0000-U+036F (Basic Latin to the combining marks) or
    U+2000-U+206F (general punctuation: curly quotes, dashes, ellipsis): ranges whose
    Unicode properties have not changed in 15 years, checked character by character in
    many contexts against the tokenizer by tests/unit/test_word_cache.py;
  - it contains no added token (<|endoftext|>, <|im_start|>, ...) and, under an NFC
    normalizer, is NFC already;
  - the regex covers it (Isolated splitting keeps unmatched gaps; we would drop them).
Every other text goes to the tokenizer itself, in one encode_batch_fast call per batch. When
a tokenizer is set up, a probe text per character of those ranges is encoded both ways;
one difference turns the cache off for that tokenizer.
"""

import itertools
import json
import re
import unicodedata

import regex

# The ByteLevel pre-tokenizer's own regex (tokenizers: pre_tokenizers/byte_level.rs).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CACHED_RANGES = ((0x0000, 0x036F), (0x2000, 0x206F))
OUTSIDE_CACHED_RANGES = "[^" + "".join(f"\\u{low:04x}-\\u{high:04x}" for low, high in CACHED_RANGES) + "]"
MAX_CACHED_PIECES = 1 << 19  # then the cache starts over: ~100 MB per worker at most


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> character map used by the ByteLevel pre-tokenizer; index = byte value."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    unprintable = (byte for byte in range(256) if byte not in printable)
    shifted = {byte: chr(256 + index) for index, byte in enumerate(unprintable)}
    return [chr(byte) if byte in printable else shifted[byte] for byte in range(256)]


def probe_texts() -> list[str]:
    """One short text per character of the cached ranges, the character in several contexts."""
    characters = (chr(code) for low, high in CACHED_RANGES for code in range(low, high + 1))
    return [f"a{c}b {c}{c} 1{c}2\n{c}'{c}s{c}  x{c}\r\n{c}" for c in characters]


def _split_pattern(spec: dict) -> str | None:
    """The regex a supported tokenizer splits with; None for any other structure."""
    pre, model, normalizer = spec.get("pre_tokenizer") or {}, spec.get("model") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("dropout") or spec.get("truncation") or spec.get("padding"):
        return None
    if normalizer is not None and normalizer.get("type") != "NFC":
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_SPLIT
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if len(steps) == 2:
        split, byte_level = steps
        if (
            split.get("type") == "Split"
            and "Regex" in split.get("pattern", {})
            and split.get("behavior") == "Isolated"
            and not split.get("invert")
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space")
        ):
            return split["pattern"]["Regex"]
    return None


class WordCacheEncoder:
    """encode_batch(texts) -> ids per text, equal to backend.encode_batch_fast(texts, add_special_tokens=False)."""

    def __init__(self, backend, pattern: str, nfc: bool, added_tokens: list[str]):
        self.backend = backend
        self.split = regex.compile(pattern).findall
        self.outside_ranges = re.compile(OUTSIDE_CACHED_RANGES).search
        self.added_token = re.compile("|".join(map(re.escape, added_tokens))).search if added_tokens else lambda text: None
        self.nfc = nfc
        self.alphabet = byte_level_alphabet()
        self.cache: dict[str, tuple[int, ...]] = {}  # piece -> its ids (tuples: the GC skips them)
        self.texts_cached = 0  # texts encoded here rather than by the tokenizer, ever

    @classmethod
    def for_tokenizer(cls, backend) -> "WordCacheEncoder | None":
        """An encoder for this tokenizers.Tokenizer, or None when its ids could differ."""
        spec = json.loads(backend.to_str())
        pattern = _split_pattern(spec)
        if pattern is None or regex.compile(pattern).groups:  # findall returns groups, not pieces
            return None
        nfc = spec.get("normalizer") is not None
        encoder = cls(backend, pattern, nfc, [token["content"] for token in spec.get("added_tokens", [])])
        probes = probe_texts()
        expected = [encoding.ids for encoding in backend.encode_batch_fast(probes, add_special_tokens=False)]
        return encoder if encoder.encode_batch(probes) == expected else None

    def _piece_ids(self, piece: str) -> tuple[int, ...]:
        mapped = "".join(self.alphabet[byte] for byte in piece.encode())
        return tuple(token.id for token in self.backend.model.tokenize(mapped))

    def _cached_ids(self, text: str) -> list[int] | None:
        """The ids of `text`, or None when the tokenizer must encode it (see the module doc)."""
        if not text.isascii() and (self.outside_ranges(text) or (self.nfc and not unicodedata.is_normalized("NFC", text))):
            return None
        if self.added_token(text):
            return None
        pieces = self.split(text)
        if sum(map(len, pieces)) != len(text):
            return None
        cache = self.cache
        try:
            return list(itertools.chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            if len(cache) > MAX_CACHED_PIECES:
                cache.clear()
            for piece in pieces:
                if piece not in cache:
                    cache[piece] = self._piece_ids(piece)
            return list(itertools.chain.from_iterable(map(cache.__getitem__, pieces)))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        ids = [self._cached_ids(text) for text in texts]
        rest = [index for index, found in enumerate(ids) if found is None]
        self.texts_cached += len(texts) - len(rest)
        if rest:
            encodings = self.backend.encode_batch_fast([texts[index] for index in rest], add_special_tokens=False)
            for index, encoding in zip(rest, encodings):
                ids[index] = encoding.ids
        return ids
