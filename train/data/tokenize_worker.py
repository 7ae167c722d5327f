"""Worker side of preprocessing: one call turns a batch of raw records into token arrays.

Workers receive raw JSON lines (bytes) or dicts, so parsing, chat rendering and
tokenization all happen off the main process, and send back flat numpy arrays (cheap to
pickle) instead of lists of Python ints.

Inside a pool worker a batch runs on the worker's own thread (`tokenize_batch_in_worker`):
the Rust tokenizer calls malloc/free several times per token (about 40% of its time in
a perf profile), and glibc serves a forked process's main thread from the arena it
inherited from the parent, fragmented by whatever the parent allocated and freed; a new
thread gets a fresh arena. Measured in benchmarks/preprocess (2 workers, 2 cores, the
parent having freed its 50 MB of texts): 8.6 instead of 9.5 CPU-seconds in the workers,
about 10% less wall time; with MALLOC_ARENA_MAX=1 the thread gains nothing.
"""

import concurrent.futures
import itertools
import json
import os
from dataclasses import dataclass

import numpy as np

from train.data.chat import RenderOptions, render_record
from train.data.errors import DataError
from train.data.word_cache import WordCacheEncoder

_state: dict = {}  # per worker process: tokenizer, options


@dataclass
class TokenizedBatch:
    tokens: np.ndarray  # (sum(lengths),) token dtype, documents back to back, EOD included
    lengths: np.ndarray  # (documents,) int32; 0 marks an empty document (skipped)
    loss_mask: np.ndarray | None  # (sum(lengths),) uint8, 1 on assistant tokens
    word_cached: int = 0  # records whose ids came from the word cache, not the tokenizer


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise DataError(f"tokenizer {path!r} cannot be loaded: {error}") from None


def init_worker(
    tokenizer, options: RenderOptions, append_eod: bool, dtype: str, with_loss_mask: bool, word_cache: bool = True
) -> None:
    """Set this process's state; forked workers inherit it from the parent (no reload)."""
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    backend = tokenizer.backend_tokenizer  # the Rust tokenizer: encode_batch
    _state.update(
        tokenizer=tokenizer,
        backend=backend,
        # Plain text: ids through a per-word cache where it is exact (word_cache.py), else None.
        word_cache=WordCacheEncoder.for_tokenizer(backend) if word_cache else None,
        options=options,
        eod=tokenizer.eos_token_id if append_eod else None,
        dtype=np.dtype(dtype),
        with_loss_mask=with_loss_mask,
    )


def start_worker(tokenizer_threads: int) -> None:
    """Pool initializer, run in each new worker: its tokenizer threads and batch thread.

    tokenizer_threads: cores per worker. At 1 the Rust tokenizer's own thread pool is
    turned off (one process per core; its idle threads would only compete). Otherwise
    that pool gets this many threads (read when the process first uses it; a parent that
    used it before forking leaves the workers without one, tokenizers' own fork rule).
    """
    if tokenizer_threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ.setdefault("RAYON_NUM_THREADS", str(tokenizer_threads))
    _state["thread"] = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize")


def tokenize_batch_in_worker(items: list) -> "TokenizedBatch":
    """Pool task: tokenize_batch on this worker's own thread (fresh malloc arena, see top)."""
    return _state["thread"].submit(tokenize_batch, items).result()


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """uint8 per token: 1 when the token starts inside an assistant span."""
    if not spans or not offsets:
        return np.zeros(len(offsets), dtype=np.uint8)
    token_starts = np.fromiter((start for start, _ in offsets), np.int64, len(offsets))
    span_starts = np.array([s for s, _ in spans])
    span_ends = np.array([e for _, e in spans])
    which = np.searchsorted(span_starts, token_starts, side="right") - 1
    inside = (which >= 0) & (token_starts < span_ends[np.maximum(which, 0)])
    return inside.astype(np.uint8)


def tokenize_batch(items: list) -> TokenizedBatch:
    """items: JSON lines (bytes/str) or dicts; one tokenizer call for the whole batch."""
    options, tokenizer, eod = _state["options"], _state["tokenizer"], _state["eod"]
    texts, spans = [], []
    for item in items:
        try:
            record = json.loads(item) if isinstance(item, (bytes, str)) else item
        except json.JSONDecodeError as error:
            raise DataError(f"input record is not valid JSON ({error}): {item[:80]!r}") from None
        text, assistant_spans = render_record(record, options, tokenizer)
        texts.append(text)
        spans.append(assistant_spans)
    need_offsets = _state["with_loss_mask"] and any(s is not None for s in spans)
    word_cached = 0
    if need_offsets:
        encodings = _state["backend"].encode_batch(texts, add_special_tokens=False)
        ids = [encoding.ids for encoding in encodings]
    elif _state["word_cache"] is not None:  # no offsets needed: the fastest way
        cached_before = _state["word_cache"].texts_cached
        ids = _state["word_cache"].encode_batch(texts)
        word_cached = _state["word_cache"].texts_cached - cached_before
    else:
        ids = [e.ids for e in _state["backend"].encode_batch_fast(texts, add_special_tokens=False)]
    extra = 0 if eod is None else 1
    lengths = np.array([len(i) + extra if i else 0 for i in ids], dtype=np.int32)
    eod_tail = [] if eod is None else [eod]
    tokens = np.fromiter(
        itertools.chain.from_iterable(i + eod_tail for i in ids if i), _state["dtype"], int(lengths.sum())
    )
    loss_mask = None
    if _state["with_loss_mask"]:
        pieces = []
        for index, document_ids in enumerate(ids):
            if not document_ids:
                continue
            if spans[index] is None:
                mask = np.ones(len(document_ids), dtype=np.uint8)
            else:
                mask = _mask_from_spans(encodings[index].offsets, spans[index])
            # EOD is a target worth learning after an answer (and always in plain text).
            pieces.append(np.append(mask, np.uint8(1)) if extra else mask)
        loss_mask = np.concatenate(pieces) if pieces else np.zeros(0, np.uint8)
    return TokenizedBatch(tokens, lengths, loss_mask, word_cached)
