"""Preprocessing throughput, side by side: python benchmarks/preprocess/run.py [--megabytes 50] [--workers 2] [--rounds 3]

Generates a JSONL of running text (~50 MB) and trains a byte-level BPE (32k vocabulary,
tens of thousands of merges) once under --work-dir, then measures tokens/s of:
  raw batch encode   the same tokenizer's encode_batch_fast over in-memory texts, one
                     process (its Rust threads use every core): the limit
  train.preprocess   our pipeline, file in -> .bin/.idx out, `--workers` processes; by
                     default most texts bypass the tokenizer through the word cache
                     (train/data/word_cache.py), and the row "word_cache=false" always
                     calls the tokenizer (the outputs of the two are compared byte for byte)
  per-document pool  the classic approach: a process pool calling encode() per document
                     (chunksize 32) and the main process writing each document
each with glibc's malloc and with the malloc train.preprocess preloads by default
(train/data/malloc.py; mimalloc when installed). Every measurement runs in a fresh process
started with or without LD_PRELOAD, after importing transformers and loading the tokenizer
once (fixed costs no row should carry); rows are interleaved over --rounds and the median
is reported. CPU-seconds: the process and its finished children; the limit shows what the
tokenizer alone costs, the other rows what they spend on top.
"""

import argparse
import filecmp
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.fixtures.synthetic_data import build_tokenizer, generate_documents, make_vocabulary  # noqa: E402
from train.config import PreprocessConfig  # noqa: E402
from train.data import malloc  # noqa: E402
from train.data.indexed_writer import IndexedDatasetWriter, commit_all  # noqa: E402
from train.data.preprocess import preprocess  # noqa: E402


def prepare(work_dir: str, megabytes: int) -> tuple[str, str]:
    source = os.path.join(work_dir, f"text_{megabytes}mb.jsonl")
    tokenizer_dir = os.path.join(work_dir, "bpe32k")
    if not os.path.exists(source):
        vocabulary = make_vocabulary(60000, seed=0)
        written, seed = 0, 0
        with open(source + ".tmp", "w") as stream:
            while written < megabytes * 1_000_000:
                for text in generate_documents(2000, 400, seed=seed, vocabulary=vocabulary):
                    line = json.dumps({"text": text}) + "\n"
                    stream.write(line)
                    written += len(line)
                seed += 1
        os.replace(source + ".tmp", source)
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        sample = generate_documents(4000, 400, seed=10_000, vocabulary=make_vocabulary(60000, seed=0))
        build_tokenizer(tokenizer_dir, sample, vocab_size=32000)
    return source, tokenizer_dir


def cpu_seconds() -> float:
    """User + system CPU of this process and of its children that have been waited for."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def read_texts(source: str) -> list[str]:
    with open(source) as stream:
        return [json.loads(line)["text"] for line in stream]


def raw_batch_encode(tokenizer_dir: str, source: str, prefix: str, workers: int) -> tuple[int, float, float]:
    from transformers import AutoTokenizer

    texts = read_texts(source)  # in memory before the clock starts: the limit only encodes
    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    started, cpu, tokens = time.perf_counter(), cpu_seconds(), 0
    for start in range(0, len(texts), 1000):
        tokens += sum(len(e.ids) for e in backend.encode_batch_fast(texts[start : start + 1000], add_special_tokens=False))
    return tokens, time.perf_counter() - started, cpu_seconds() - cpu


_tokenizer = None


def _init_per_document(tokenizer_dir):
    global _tokenizer
    from transformers import AutoTokenizer

    _tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_one(line: str) -> list[int]:
    return _tokenizer.encode(json.loads(line)["text"], add_special_tokens=False) + [_tokenizer.eos_token_id]


def per_document_pool(tokenizer_dir: str, source: str, prefix: str, workers: int) -> tuple[int, float, float]:
    started, cpu = time.perf_counter(), cpu_seconds()
    writer = IndexedDatasetWriter(prefix, np.uint16)
    with multiprocessing.get_context("fork").Pool(workers, _init_per_document, (tokenizer_dir,)) as pool:
        with open(source) as stream:
            for ids in pool.imap(_encode_one, stream, chunksize=32):
                writer.add_documents(np.array(ids, dtype=np.uint16), np.array([len(ids)]))
    writer.finish()
    commit_all([writer])
    return writer.token_count, time.perf_counter() - started, cpu_seconds() - cpu


def ours(tokenizer_dir: str, source: str, prefix: str, workers: int, word_cache: bool = True) -> tuple[int, float, float]:
    # malloc=system: the measuring process was started with or without a preloaded malloc.
    config = PreprocessConfig(
        input=source, output_prefix=prefix, tokenizer=tokenizer_dir, workers=workers, malloc="system", word_cache=word_cache
    )
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = preprocess(config)
    return summary.tokens["train"], time.perf_counter() - started, cpu_seconds() - cpu


def ours_through_the_tokenizer(tokenizer_dir: str, source: str, prefix: str, workers: int) -> tuple[int, float, float]:
    return ours(tokenizer_dir, source, prefix, workers, word_cache=False)


METHODS = {"raw": raw_batch_encode, "ours": ours, "ours_tokenizer": ours_through_the_tokenizer, "pool": per_document_pool}
LABELS = {
    "raw": "raw `encode_batch_fast` (the limit)",
    "ours": "`train.preprocess` (ours)",
    "ours_tokenizer": "`train.preprocess word_cache=false`",
    "pool": "per-document `encode()` in a pool",
}


def measure_in_child(method: str, preload: str | None, args) -> dict:
    """One measurement in a fresh process, with `preload` as its malloc (None: glibc's)."""
    environment = dict(os.environ)
    environment.pop("LD_PRELOAD", None)
    if preload:
        environment["LD_PRELOAD"] = preload
    command = [sys.executable, __file__, "--measure", method, "--work-dir", args.work_dir,
               "--megabytes", str(args.megabytes), "--workers", str(args.workers)]  # fmt: skip
    result = subprocess.run(command, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{method} with malloc {preload or 'glibc'} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure_here(method: str, args) -> None:
    """Child side: warm the imports and the tokenizer, run one method, print one JSON line."""
    from transformers import AutoTokenizer

    source, tokenizer_dir = prepare(args.work_dir, args.megabytes)
    AutoTokenizer.from_pretrained(tokenizer_dir)
    prefix = os.path.join(args.work_dir, method)
    tokens, seconds, cpu = METHODS[method](tokenizer_dir, source, prefix, args.workers)
    print(json.dumps({"tokens": tokens, "seconds": seconds, "cpu": cpu, "malloc": malloc.loaded() or "glibc"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default="/tmp/bench_preprocess")
    parser.add_argument("--measure", choices=METHODS, help=argparse.SUPPRESS)  # internal: one child measurement
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    if args.measure:
        return measure_here(args.measure, args)
    started = time.perf_counter()
    source, _ = prepare(args.work_dir, args.megabytes)
    print(f"prepared {os.path.getsize(source) / 1e6:.0f} MB JSONL and a 32k BPE in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    preload = malloc.resolve("auto")  # what train.preprocess preloads by default
    if preload is None:
        print("no mimalloc / tcmalloc / jemalloc installed: glibc rows only", file=sys.stderr)
    rows = [(method, library) for method in METHODS for library in dict.fromkeys([preload, None])]
    runs = {row: [] for row in rows}
    for round_index in range(args.rounds):
        for method, library in rows:
            runs[method, library].append(measure_in_child(method, library, args))
            print(f"round {round_index + 1}: {method} {library or 'glibc'} {runs[method, library][-1]}", file=sys.stderr)
    # The raw encode has no EOD: every other row has one token more per document.
    documents = len(read_texts(source))
    counts = {row: results[0]["tokens"] + documents * (row[0] == "raw") for row, results in runs.items()}
    assert len(set(counts.values())) == 1, f"pipelines disagree on token counts: {counts}"
    for suffix in (".bin", ".idx"):
        with_cache, without = (os.path.join(args.work_dir, f"{m}_text_document{suffix}") for m in ("ours", "ours_tokenizer"))
        assert filecmp.cmp(with_cache, without, shallow=False), f"{with_cache} differs from {without}: the word cache changed the ids"
    seconds = {row: statistics.median(r["seconds"] for r in results) for row, results in runs.items()}
    cpu = {row: statistics.median(r["cpu"] for r in results) for row, results in runs.items()}
    rate = {row: runs[row][0]["tokens"] / seconds[row] for row in rows}
    ours_rate = rate["ours", preload]

    print(f"\n{os.path.getsize(source) / 1e6:.0f} MB JSONL, {counts[rows[0]]:,} tokens, 32k BPE, {args.workers} workers, "
          f"{os.cpu_count()} cores, median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"| method | malloc | seconds | CPU-seconds | tokens/s | ours vs it |\n|---|---|---|---|---|---|")
    for row in rows:
        name = os.path.basename(runs[row][0]["malloc"])
        print(f"| {LABELS[row[0]]} | {name} | {seconds[row]:.2f} | {cpu[row]:.1f} | {rate[row]:,.0f} | {ours_rate / rate[row]:.2f} |")
    print(f"ours (defaults) vs the limit with the same malloc: {ours_rate / rate['raw', preload]:.2f} (target >= 0.80)")
    print(f"ours (defaults) vs the classic pool (glibc): {ours_rate / rate['pool', None]:.2f} (target >= 2)")
    print("outputs with and without the word cache: byte-identical")


if __name__ == "__main__":
    main()
