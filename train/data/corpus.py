"""A small real-text corpus every machine with Python has: the docstrings of the standard library.

    python -m train.data corpus --output data/quickstart/stdlib.jsonl [--documents 1500]

One JSON object per line, {"text": docstring}: the input form of train.preprocess and of
`python -m train.data tokenizer`. English prose with code, a few MB: enough for a tiny model's
loss to fall well below uniform in a minute (the quick start, launchers/quickstart.sh).
"""

import ast
import json
import sysconfig
from pathlib import Path

MIN_CHARACTERS = 200  # shorter docstrings are mostly one-line summaries


def stdlib_docstrings(limit: int, subpackages: bool = False) -> list[str]:
    """Up to `limit` module, class and function docstrings of the stdlib's top-level modules, in file
    order; with subpackages, of every stdlib module (~2,800 docstrings, 1.7 MB; never site-packages)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(stdlib.rglob("*.py") if subpackages else stdlib.glob("*.py"))
    texts = []
    for path in paths:
        if path.relative_to(stdlib).parts[0] in ("site-packages", "dist-packages"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) > MIN_CHARACTERS:
                    texts.append(text)
        if len(texts) >= limit:
            break
    return texts[:limit]


def write_corpus(output: str | Path, documents: int) -> int:
    """Writes the JSONL (atomically: a partial file never has the final name); returns the record count."""
    output = Path(output)
    texts = stdlib_docstrings(documents)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".tmp")
    partial.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    partial.replace(output)
    return len(texts)
