"""A progress line on stderr: documents/s, tokens/s, ETA when the total is known."""

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


class Progress:
    """Redraws one line on a terminal; elsewhere (SLURM logs) prints a line every 30 s."""

    def __init__(self, total_documents: int | None, stream=sys.stderr):
        self.total = total_documents
        self.stream = stream
        self.interactive = stream.isatty()
        self.interval_s = 0.5 if self.interactive else 30.0
        self.started = time.monotonic()
        self.last_shown = 0.0
        self.documents = 0
        self.tokens = 0

    def update(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last_shown >= self.interval_s:
            self.last_shown = now
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        line = (
            f"documents {_count(self.documents)}"
            + (f"/{_count(self.total)}" if self.total else "")
            + f" ({_count(self.documents / elapsed)}/s)  tokens {_count(self.tokens)}"
            + f" ({_count(self.tokens / elapsed)}/s)  elapsed {_duration(elapsed)}"
        )
        if self.total and self.documents:
            remaining = (self.total - self.documents) * elapsed / self.documents
            line += f"  ETA {_duration(max(remaining, 0))}"
        self.stream.write(("\r" + line + "\033[K") if self.interactive else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self._show(time.monotonic())
        if self.interactive:
            self.stream.write("\n")
        self.stream.flush()
