"""Blended packed dataset read speed vs plain np.memmap slicing: python benchmarks/dataloader/run.py [--samples 3000]

Three generated Megatron pairs (blend 20/50/30) at sequence length 4096. Both methods
return int64 arrays of 4097 tokens from the same .bin files:
  np.memmap slicing   a random contiguous window of one file per sample: the floor cost
                      of reading the bytes, with no packing or blending bookkeeping
  BlendedDataset      ours: blend index -> GPTDataset shuffle -> packed documents (with
                      the loss mask built too), index building excluded (it is cached)
Methods alternate over rounds and the best round of each counts (the machine is shared).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.fixtures.synthetic_data import write_random_documents  # noqa: E402
from train.data.build import build_datasets  # noqa: E402

SEQ_LENGTH = 4096
WEIGHTS = (0.2, 0.5, 0.3)


def make_sources(work_dir: str, tokens_each: int) -> list[str]:
    prefixes = []
    for number in range(len(WEIGHTS)):
        prefix = os.path.join(work_dir, f"source{number}_text_document")
        if not os.path.exists(prefix + ".idx"):
            write_random_documents(prefix, tokens_each // 600, 600, 32000, 0, seed=number)
        prefixes.append(prefix)
    return prefixes


def read_memmap(prefixes: list[str], samples: int, seed: int) -> float:
    arrays = [np.memmap(prefix + ".bin", dtype=np.uint16, mode="r") for prefix in prefixes]
    rng = np.random.default_rng(seed)
    choices = rng.choice(len(arrays), size=samples, p=WEIGHTS)
    starts = rng.random(samples)
    started = time.perf_counter()
    checksum = 0
    for source, fraction in zip(choices, starts):
        array = arrays[source]
        start = int(fraction * (len(array) - SEQ_LENGTH - 1))
        tokens = np.asarray(array[start : start + SEQ_LENGTH + 1], dtype=np.int64)
        checksum += int(tokens[0])
    return time.perf_counter() - started


def read_blended(dataset, samples: int, first: int) -> float:
    started = time.perf_counter()
    checksum = 0
    for index in range(first, first + samples):
        sample = dataset[index]
        checksum += int(sample["tokens"][0])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens-per-source", type=int, default=30_000_000)
    parser.add_argument("--work-dir", default="/tmp/bench_dataloader")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    prefixes = make_sources(args.work_dir, args.tokens_per_source)
    blend = {"train": [w for pair in zip(WEIGHTS, prefixes) for w in pair]}
    total = args.samples * args.rounds
    started = time.perf_counter()
    dataset = build_datasets(blend, SEQ_LENGTH, {"train": total}, seed=1, cache_dir=os.path.join(args.work_dir, "cache"))["train"]
    index_s = time.perf_counter() - started
    memmap_s, blended_s = [], []
    for round_number in range(args.rounds):
        memmap_s.append(read_memmap(prefixes, args.samples, round_number))
        blended_s.append(read_blended(dataset, args.samples, round_number * args.samples))
    memmap_rate, blended_rate = args.samples / min(memmap_s), args.samples / min(blended_s)
    print(f"\n3 sources x {args.tokens_per_source / 1e6:.0f}M tokens, blend 20/50/30, seq {SEQ_LENGTH}, "
          f"{args.samples} samples per round, best of {args.rounds}; index built/loaded in {index_s:.1f} s")
    print(f"{'method':<28} {'samples/s':>10} {'tokens/s':>14} {'ours / it':>10}")
    print(f"{'np.memmap slicing':<28} {memmap_rate:>10,.0f} {memmap_rate * SEQ_LENGTH:>14,.0f} {blended_rate / memmap_rate:>10.2f}")
    print(f"{'BlendedDataset (ours)':<28} {blended_rate:>10,.0f} {blended_rate * SEQ_LENGTH:>14,.0f} {1.0:>10.2f}")
    print("target: ours >= 0.50 x np.memmap slicing")


if __name__ == "__main__":
    main()
