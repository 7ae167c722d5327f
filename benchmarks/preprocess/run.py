"""Preprocessing throughput, side by side: python benchmarks/preprocess/run.py [--megabytes 50] [--workers 2]

Generates a JSONL of running text (~50 MB) and trains a byte-level BPE (32k vocabulary,
tens of thousands of merges) once under --work-dir, then measures tokens/s of:
  raw batch encode   the same tokenizer's encode_batch_fast over in-memory texts, one
                     process (its Rust threads use every core): the limit
  train.preprocess   our pipeline, file in -> .bin/.idx out, `--workers` processes
  per-document pool  the classic approach: a process pool calling encode() per document
                     (chunksize 32) and the main process writing each document
Each row also gives the CPU-seconds spent (this process and its finished children): the
limit shows what the tokenizer alone costs, the other rows what they spend on top.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from train.config import PreprocessConfig  # noqa: E402
from train.data.indexed_writer import IndexedDatasetWriter, commit_all  # noqa: E402
from train.data.preprocess import preprocess  # noqa: E402
from train.data.synthetic import build_tokenizer, generate_documents, make_vocabulary  # noqa: E402


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


def raw_batch_encode(tokenizer_dir: str, texts: list[str]) -> tuple[int, float, float]:
    from transformers import AutoTokenizer

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


def ours(tokenizer_dir: str, source: str, prefix: str, workers: int) -> tuple[int, float, float]:
    config = PreprocessConfig(input=source, output_prefix=prefix, tokenizer=tokenizer_dir, workers=workers)
    started, cpu = time.perf_counter(), cpu_seconds()
    summary = preprocess(config)
    return summary.tokens["train"], time.perf_counter() - started, cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work-dir", default="/tmp/bench_preprocess")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    started = time.perf_counter()
    source, tokenizer_dir = prepare(args.work_dir, args.megabytes)
    print(f"prepared {os.path.getsize(source) / 1e6:.0f} MB JSONL and a 32k BPE in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    texts = read_texts(source)
    raw_tokens, raw_s, raw_cpu = raw_batch_encode(tokenizer_dir, texts)
    del texts
    our_tokens, our_s, our_cpu = ours(tokenizer_dir, source, os.path.join(args.work_dir, "ours"), args.workers)
    pool_tokens, pool_s, pool_cpu = per_document_pool(tokenizer_dir, source, os.path.join(args.work_dir, "per_document"), args.workers)
    assert our_tokens == pool_tokens == raw_tokens + len(read_texts(source)), "pipelines disagree on token counts"
    raw_rate, our_rate, pool_rate = raw_tokens / raw_s, our_tokens / our_s, pool_tokens / pool_s
    print(f"\n{os.path.getsize(source) / 1e6:.0f} MB JSONL, {our_tokens:,} tokens, 32k BPE, {args.workers} workers, {os.cpu_count()} cores")
    print(f"{'method':<36} {'seconds':>8} {'cpu s':>6} {'tokens/s':>12} {'ours / it':>10}")
    for name, seconds, cpu, rate in (
        ("raw batch encode (the limit)", raw_s, raw_cpu, raw_rate),
        ("train.preprocess (ours, end to end)", our_s, our_cpu, our_rate),
        ("per-document encode in a pool", pool_s, pool_cpu, pool_rate),
    ):
        print(f"{name:<36} {seconds:>8.2f} {cpu:>6.1f} {rate:>12,.0f} {our_rate / rate:>10.2f}")
    print("targets: ours >= 0.80 x raw batch encode; ours >= 2 x per-document pool")


if __name__ == "__main__":
    main()
