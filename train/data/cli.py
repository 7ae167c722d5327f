"""`python -m train.data inspect PREFIX [--tokenizer DIR] [--vocab-size N]`,
`python -m train.data blend --recipe RECIPE.yaml --out DIR [--seq-length N]`,
`python -m train.data corpus --output X.jsonl [--documents N]` (train/data/corpus.py) and
`python -m train.data tokenizer --input X.jsonl --vocab-size N --output DIR` (train/data/tokenizer.py)."""

import argparse
import os
import sys

import numpy as np

from train.data.errors import DataError


def inspect(prefix: str, tokenizer_dir: str | None, vocab_size: int | None, sample_index: int) -> None:
    from train.data.gpt_dataset import loss_mask_prefix
    from train.data.indexed import INDEX_MAGIC, IndexedDataset, check_vocab, pair_exists

    dataset = IndexedDataset(prefix)
    lengths = dataset.sequence_lengths
    print(f"prefix:           {prefix}")
    print(f"files:            .idx {os.path.getsize(prefix + '.idx'):,} bytes, .bin {os.path.getsize(prefix + '.bin'):,} bytes")
    print(f"header:           magic {INDEX_MAGIC!r}, version 1, dtype code {dataset.header.dtype_code} ({dataset.dtype.name})")
    print(f"sequences:        {len(dataset):,}")
    print(f"documents:        {dataset.document_count:,} ({len(dataset.document_indices):,} document indices)")
    print(f"tokens:           {dataset.token_count:,}")
    if len(dataset):
        print(f"sequence length:  min {lengths.min():,}, mean {lengths.mean():,.1f}, max {lengths.max():,}")
    print(f"loss mask:        {'present' if pair_exists(loss_mask_prefix(prefix)) else 'none'}")
    if vocab_size is not None:
        check_vocab(dataset, vocab_size)
        print(f"vocabulary:       every id < {vocab_size:,}")
    if not len(dataset):
        return
    tokens = dataset[sample_index]
    print(f"sample {sample_index}:         {len(tokens):,} tokens, first ids {tokens[:16].tolist()}")
    if tokenizer_dir:
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(tokenizer_dir).decode(np.asarray(tokens[:200]).tolist())
        print("decoded (first 200 tokens):")
        print(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data", description="Megatron data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_parser = commands.add_parser("inspect", help="header, counts, dtype and a decoded sample")
    inspect_parser.add_argument("prefix", help="path without .bin/.idx")
    inspect_parser.add_argument("--tokenizer", help="HF tokenizer directory to decode the sample")
    inspect_parser.add_argument("--vocab-size", type=int, help="also check every id is below this")
    inspect_parser.add_argument("--sample", type=int, default=0, help="sequence to show")
    blend_parser = commands.add_parser("blend", help="write datablend_<name>.json from a recipe")
    blend_parser.add_argument("--recipe", required=True, help="recipe .yaml or .json")
    blend_parser.add_argument("--out", required=True, help="directory for datablend_<name>.json")
    blend_parser.add_argument("--seq-length", type=int, default=4096, help="for the samples column")
    corpus_parser = commands.add_parser("corpus", help="write a small real-text JSONL (the stdlib's docstrings)")
    corpus_parser.add_argument("--output", required=True, help="the .jsonl to write")
    corpus_parser.add_argument("--documents", type=int, default=1500, help="docstrings to write")
    tokenizer_parser = commands.add_parser("tokenizer", help="train a byte-level BPE on a JSONL; save an HF tokenizer")
    tokenizer_parser.add_argument("--input", required=True, help="JSONL, one record per line")
    tokenizer_parser.add_argument("--vocab-size", type=int, required=True, help="tokens, special ones included")
    tokenizer_parser.add_argument("--output", required=True, help="HF tokenizer directory to write")
    tokenizer_parser.add_argument("--text-field", default="text", help="the records' text key")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            inspect(args.prefix, args.tokenizer, args.vocab_size, args.sample)
        elif args.command == "corpus":
            from train.data.corpus import write_corpus

            print(f"wrote {args.output}: {write_corpus(args.output, args.documents):,} documents")
        elif args.command == "tokenizer":
            from train.data.tokenizer import build_tokenizer, read_texts

            texts = read_texts(args.input, args.text_field)
            print(f"wrote {build_tokenizer(args.output, texts, args.vocab_size)}: byte-level BPE of up to "
                  f"{args.vocab_size:,} tokens (fewer if the text has fewer merges) from {len(texts):,} records, "
                  "ChatML chat template")
        else:
            from train.data.blend_recipe import write_blend

            path, report = write_blend(args.recipe, args.out, args.seq_length)
            print("\n".join(report))
            print(f"wrote {path}")
    except (DataError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
