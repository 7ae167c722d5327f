"""Input records for preprocessing: local jsonl/json/parquet/arrow files or an HF dataset.

`open_records(...)` returns an iterator over batches of raw records plus the record count
when it is cheap to know (for the ETA). JSON lines travel as bytes and are parsed by
the workers; other formats yield dicts.
"""

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterator

from train.data.errors import DataError

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass
class RecordSource:
    batches: Iterator[list]
    total: int | None  # records that will be read (max_docs applied), when known
    description: str


def local_files(input_path: str) -> list[str]:
    """The files an input names: a file, a directory of supported files, or a glob."""
    if os.path.isdir(input_path):
        candidates = sorted(glob.glob(os.path.join(input_path, "*")))
    else:
        candidates = sorted(glob.glob(input_path))
    return [path for path in candidates if path.endswith(LOCAL_FORMATS) and os.path.isfile(path)]


def looks_local(input_path: str) -> bool:
    return os.path.exists(input_path) or any(ch in input_path for ch in "*?") or input_path.endswith(LOCAL_FORMATS)


def _count_lines(path: str) -> int:
    count = 0
    with open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            count += block.count(b"\n")
    return count


def _json_records(path: str) -> Iterator:
    """A JSON array file yields dicts; anything else is read as JSON lines (bytes)."""
    with open(path, "rb") as stream:
        head = stream.read(4096).lstrip()
    if head.startswith(b"["):
        with open(path) as stream:
            try:
                yield from json.load(stream)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: not valid JSON ({error})") from None
        return
    with open(path, "rb") as stream:
        for line in stream:
            if line.strip():
                yield line


def _parquet_records(path: str) -> Iterator[dict]:
    import pyarrow.parquet

    for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def _arrow_records(path: str) -> Iterator[dict]:
    import datasets

    yield from datasets.Dataset.from_file(path)


def _file_records(path: str) -> Iterator:
    if path.endswith(".parquet"):
        return _parquet_records(path)
    if path.endswith(".arrow"):
        return _arrow_records(path)
    return _json_records(path)


def _file_total(path: str) -> int | None:
    if path.endswith(".jsonl"):
        return _count_lines(path)
    if path.endswith(".parquet"):
        import pyarrow.parquet

        return pyarrow.parquet.ParquetFile(path).metadata.num_rows
    return None


def _hub_dataset(name: str, subset: str | None, split: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except Exception as error:  # datasets raises many types; all mean "cannot use this input"
        raise DataError(
            f"dataset {name!r} (subset {subset!r}, split {split!r}) cannot be loaded: "
            f"{type(error).__name__}: {error} (offline runs need it in the HF cache)"
        ) from None


def _batched(records: Iterator, batch_size: int, max_records: int | None) -> Iterator[list]:
    batch, seen = [], 0
    for record in records:
        if max_records is not None and seen >= max_records:
            break
        batch.append(record)
        seen += 1
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_records(
    input_name: str, subset: str | None, split: str, batch_size: int, max_records: int | None, streaming: bool = False
) -> RecordSource:
    if looks_local(input_name):
        paths = local_files(input_name)
        if not paths:
            raise DataError(f"input {input_name!r}: no {'/'.join(LOCAL_FORMATS)} files found")

        def records():
            for path in paths:
                yield from _file_records(path)

        totals = [_file_total(path) for path in paths]
        total = sum(totals) if None not in totals else None
        description = ", ".join(paths[:3]) + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
    else:
        dataset = _hub_dataset(input_name, subset, split, streaming)
        records = lambda: iter(dataset)  # noqa: E731
        total = None if streaming else len(dataset)
        description = f"{input_name} [{subset or 'default'}/{split}]"
    if max_records is not None:
        total = max_records if total is None else min(total, max_records)
    return RecordSource(_batched(records(), batch_size, max_records), total, description)
