"""A faster malloc for preprocessing: `python -m train.preprocess` re-executes itself with one preloaded.

The Rust tokenizer calls malloc/free several times per token; under glibc that is about
40% of its time (perf). mimalloc, tcmalloc and jemalloc serve those small short-lived
blocks from per-thread caches. Measured on 2 cores (benchmarks/preprocess, word_cache=false
so every text goes through the tokenizer): 5.8 instead of 8.4 CPU-s with mimalloc. Text the
word cache takes (word_cache.py) hardly allocates and gains nothing; chat data and
non-Latin text do.

The dynamic loader reads LD_PRELOAD only when a process starts, so the entrypoint execs
its own command line once more with the library added, before any work; the pool workers
fork from that process and inherit it. Output is byte-identical whichever malloc runs.

    malloc=auto       the first installed of mimalloc, tcmalloc, jemalloc; else glibc's
    malloc=system     glibc's malloc, no re-exec
    malloc=mimalloc   (or tcmalloc / jemalloc) that one; an error when it is not installed
    malloc=/path/libX.so   any other malloc library
"""

import ctypes.util
import os
import sys

from train.data.errors import DataError

# Name accepted in malloc=...  ->  the library's name for ctypes.util.find_library (ldconfig).
KNOWN = {"mimalloc": "mimalloc", "tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}
APT_PACKAGES = {"mimalloc": "libmimalloc2.0", "tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}
_REEXECUTED = "TRAIN_MALLOC_REEXECUTED"  # set for the re-executed process only: never loop


def resolve(choice: str) -> str | None:
    """The library to preload for `choice` (see the module doc); None means glibc's malloc."""
    if choice == "system":
        return None
    if choice == "auto":
        return next(filter(None, map(ctypes.util.find_library, KNOWN.values())), None)
    if choice in KNOWN:
        library = ctypes.util.find_library(KNOWN[choice])
        if library is None:
            raise DataError(
                f"malloc={choice}: lib{KNOWN[choice]} is not installed "
                f"(apt-get install {APT_PACKAGES[choice]}), or use malloc=auto / malloc=system"
            )
        return library
    if os.path.isfile(choice):
        return os.path.abspath(choice)
    raise DataError(f"malloc={choice!r}: expected auto, system, {', '.join(KNOWN)} or the path of a malloc library")


def loaded(library: str | None = None, maps_path: str = "/proc/self/maps") -> str | None:
    """Path of the malloc library mapped into this process (a known one, or `library`); None: glibc's."""
    stems = tuple(f"lib{name.split('_')[0]}." for name in KNOWN.values())  # libmimalloc. libtcmalloc. ...
    real = os.path.realpath(library) if library and os.path.isabs(library) else None
    try:
        with open(maps_path) as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:  # not Linux
        return None
    return next((p for p in paths if os.path.basename(p).startswith(stems) or p == real), None)


def reexec_with(choice: str) -> None:
    """Exec this command line again with `choice`'s malloc preloaded; returns when there is nothing to do.

    Nothing to do: malloc=system, none installed (auto), one already loaded, or this is
    the re-executed process (the loader may have refused the library: then glibc it is).
    """
    library = resolve(choice)
    if os.environ.pop(_REEXECUTED, None) or library is None or loaded(library):
        return
    preload = " ".join(filter(None, (library, os.environ.get("LD_PRELOAD"))))
    environment = dict(os.environ, LD_PRELOAD=preload, **{_REEXECUTED: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
