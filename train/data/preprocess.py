"""Preprocessing: input records -> tokenized Megatron pairs (driven by `python -m train.preprocess`).

Outputs for output_prefix=P (all Megatron pairs, see indexed.py for the bytes):
    P_text_document.bin/.idx              training documents, one sequence each
    P_valid_text_document.bin/.idx        with validation_fraction > 0: the held-out
                                          documents (chosen per document from the seed)
    <each of the above>_loss_mask.bin/.idx  for chat/SFT input: uint8, one value per token
                                          (1 on assistant tokens), same sequence lengths
Everything is written under temporary names and renamed only after the last document.

Work split: the main process reads raw records in batches and writes results in order;
`workers` processes parse, render and tokenize whole batches (tokenize_worker.py), each
on its own thread, with the Rust tokenizer's thread pool sized to cores // workers (off
at 1). Plain Latin-script text skips the tokenizer through a per-word cache that gives
its ids (word_cache.py). Measured on 2 cores (benchmarks/preprocess, 2 workers): 2.8x a
per-document encode() pool and 1.3x the tokenizer's own batch encode of in-memory texts.
"""

import collections
import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from train.data.chat import RenderOptions, record_kind
from train.data.errors import DataError
from train.data.gpt_dataset import loss_mask_prefix
from train.data.indexed import token_dtype_for_vocab
from train.data.indexed_writer import IndexedDatasetWriter, commit_all
from train.data.progress import Progress
from train.data.readers import open_records
from train.data import malloc, tokenize_worker


def output_prefixes(output_prefix: str) -> dict[str, str]:
    return {"train": f"{output_prefix}_text_document", "valid": f"{output_prefix}_valid_text_document"}


@dataclass
class PreprocessSummary:
    documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0})
    tokens: dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0})
    records_read: int = 0
    empty_skipped: int = 0
    word_cached: int = 0  # records encoded by the word cache (word_cache.py), not the tokenizer
    seconds: float = 0.0
    malloc: str = "glibc"  # the malloc library this process ran with (malloc.py)
    outputs: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        total_tokens = sum(self.tokens.values())
        rate = total_tokens / self.seconds if self.seconds else 0.0
        lines = [
            f"records read:     {self.records_read:,}",
            f"documents:        {self.documents['train']:,} train, {self.documents['valid']:,} valid",
            f"tokens:           {self.tokens['train']:,} train, {self.tokens['valid']:,} valid",
            f"empty skipped:    {self.empty_skipped:,}",
            f"word cache:       {self.word_cached:,} of {self.records_read:,} records",
            f"seconds:          {self.seconds:.1f} ({rate:,.0f} tokens/s)",
            f"malloc:           {self.malloc}",
        ]
        return lines + [f"wrote:            {output}" + ("" if output.endswith(".json") else ".bin/.idx")
                        for output in self.outputs]


def _check(config) -> None:
    if config.workers < 1:
        raise DataError(f"workers={config.workers}: need at least 1")
    if config.batch_size < 1:
        raise DataError(f"batch_size={config.batch_size}: need at least 1")
    if not 0.0 <= config.validation_fraction < 1.0:
        raise DataError(f"validation_fraction={config.validation_fraction}: must be in [0, 1)")
    if config.max_docs is not None and config.max_docs < 1:
        raise DataError(f"max_docs={config.max_docs}: must be positive (or null for all)")


def _render_options(config) -> RenderOptions:
    return RenderOptions(
        text_field=config.text_field,
        format=getattr(config, "format", "auto"),
        chat=config.chat,
        keep_cot=config.keep_cot,
        reasoning_start=getattr(config, "reasoning_start", "<think>"),
        reasoning_end=getattr(config, "reasoning_end", "</think>"),
    )


def _first_record_kind(item, options: RenderOptions) -> str:
    try:
        record = json.loads(item) if isinstance(item, (bytes, str)) else item
    except json.JSONDecodeError as error:
        raise DataError(f"first input record is not valid JSON ({error})") from None
    return record_kind(record, options)


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / SLURM's CPU binding
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ordered_results(batches, worker_arguments, workers: int):
    """(batch, TokenizedBatch) in input order; at most 2 batches per worker in flight."""
    # The loaded tokenizer reaches forked workers by inheritance: loading it once per
    # worker would cost ~1 s each. The parent never encodes, so the Rust tokenizer's
    # thread pool is still unused at fork time (it would disable parallelism otherwise).
    tokenize_worker.init_worker(*worker_arguments)
    if workers == 1:
        for batch in batches:
            yield batch, tokenize_worker.tokenize_batch(batch)
        return
    # Each worker's tokenizer gets its share of the cores (1 on a 2-core machine with 2 workers).
    tokenizer_threads = max(1, _available_cores() // workers)
    with multiprocessing.get_context("fork").Pool(workers, tokenize_worker.start_worker, (tokenizer_threads,)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(tokenize_worker.tokenize_batch_in_worker, (batch,))))
            if len(pending) >= 2 * workers:
                batch_done, result = pending.popleft()
                yield batch_done, result.get()
        while pending:
            batch_done, result = pending.popleft()
            yield batch_done, result.get()


def _split_documents(result, goes_valid: np.ndarray):
    """Yield (split, tokens, lengths, loss_mask) for the non-empty documents of one batch."""
    keep = result.lengths > 0
    token_in_valid = np.repeat(goes_valid[keep], result.lengths[keep])
    for split, document_choice, token_choice in (
        ("train", keep & ~goes_valid, ~token_in_valid),
        ("valid", keep & goes_valid, token_in_valid),
    ):
        if document_choice.any():
            mask = None if result.loss_mask is None else result.loss_mask[token_choice]
            yield split, result.tokens[token_choice], result.lengths[document_choice], mask


def write_datablend(path: str, prefixes: dict[str, str]) -> str:
    """datablend JSON (train/data/blend.py's form) naming each split's output at weight 1; prefixes
    relative to the blend's directory, so the two can move together. Returns the path."""
    directory = os.path.dirname(os.path.abspath(path))
    blend = {split: [1.0, os.path.relpath(os.path.abspath(prefix), directory)] for split, prefix in prefixes.items()}
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(blend, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def preprocess(config) -> PreprocessSummary:
    """Run the whole conversion; DataError on bad input before anything final is written."""
    started = time.monotonic()
    _check(config)
    tokenizer = tokenize_worker.load_tokenizer(config.tokenizer)
    if config.append_eod and tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {config.tokenizer!r} has no eos token to append as EOD")
    dtype = np.dtype(token_dtype_for_vocab(len(tokenizer)))
    options = _render_options(config)
    source = open_records(config.input, config.subset, config.split, config.batch_size, config.max_docs, getattr(config, "streaming", False))
    first_batch = next(source.batches, None)
    if not first_batch:
        raise DataError(f"input {config.input!r} holds no records")
    with_loss_mask = getattr(config, "loss_mask", None)
    if with_loss_mask is None:  # auto: chat/SFT records get a loss mask
        with_loss_mask = _first_record_kind(first_batch[0], options) != "text"

    splits = ["train"] + (["valid"] if config.validation_fraction > 0 else [])
    prefixes = output_prefixes(config.output_prefix)
    writers = {split: IndexedDatasetWriter(prefixes[split], dtype) for split in splits}
    mask_writers = {}
    if with_loss_mask:
        mask_writers = {s: IndexedDatasetWriter(loss_mask_prefix(prefixes[s]), np.uint8) for s in splits}
    every_writer = list(writers.values()) + list(mask_writers.values())
    summary = PreprocessSummary()
    progress = Progress(source.total)
    batches = _prepend(first_batch, source.batches)
    word_cache = getattr(config, "word_cache", True)
    worker_arguments = (tokenizer, options, config.append_eod, dtype.str, with_loss_mask, word_cache)
    try:
        for batch, result in _ordered_results(batches, worker_arguments, config.workers):
            first_index = summary.records_read
            rng = np.random.default_rng([config.seed, first_index])
            goes_valid = rng.random(len(batch)) < config.validation_fraction
            for split, tokens, lengths, mask in _split_documents(result, goes_valid):
                writers[split].add_documents(tokens, lengths)
                if mask is not None:
                    mask_writers[split].add_documents(mask, lengths)
            summary.records_read += len(batch)
            summary.empty_skipped += int(np.sum(result.lengths == 0))
            summary.word_cached += result.word_cached
            progress.update(len(batch), len(result.tokens))
        progress.close()
        for split, writer in writers.items():
            summary.documents[split] = writer.document_count
            summary.tokens[split] = writer.token_count
        if summary.documents["train"] == 0:
            raise DataError(
                f"input {config.input!r}: all {summary.records_read} records were empty "
                "(or went to validation); nothing to write"
            )
        for writer in every_writer:
            writer.finish()
        commit_all(every_writer)
    except BaseException:
        for writer in every_writer:
            writer.discard()
        raise
    summary.outputs = [writer.prefix for writer in every_writer]
    if config.datablend:
        summary.outputs.append(write_datablend(config.datablend, {split: prefixes[split] for split in splits}))
    summary.seconds = time.monotonic() - started
    summary.malloc = malloc.loaded() or "glibc"
    return summary


def _prepend(first, rest):
    yield first
    yield from rest


def print_summary(summary: PreprocessSummary, stream=sys.stdout) -> None:
    for line in summary.lines():
        print(line, file=stream)
