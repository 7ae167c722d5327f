"""The malloc choice of preprocessing (train/data/malloc.py): pytest tests/unit/test_malloc.py"""

import os
import subprocess
import sys

import pytest

from train.data import malloc
from train.data.errors import DataError


def fake_ldconfig(monkeypatch, installed: dict[str, str]):
    monkeypatch.setattr(malloc.ctypes.util, "find_library", lambda name: installed.get(name))


def test_auto_takes_the_first_installed_in_order(monkeypatch):
    fake_ldconfig(monkeypatch, {"jemalloc": "libjemalloc.so.2", "tcmalloc_minimal": "libtcmalloc_minimal.so.4"})
    assert malloc.resolve("auto") == "libtcmalloc_minimal.so.4"
    fake_ldconfig(monkeypatch, {"jemalloc": "libjemalloc.so.2", "mimalloc": "libmimalloc.so.2"})
    assert malloc.resolve("auto") == "libmimalloc.so.2"
    fake_ldconfig(monkeypatch, {})
    assert malloc.resolve("auto") is None
    assert malloc.resolve("system") is None


def test_named_and_path_choices(monkeypatch, tmp_path):
    fake_ldconfig(monkeypatch, {"jemalloc": "libjemalloc.so.2"})
    assert malloc.resolve("jemalloc") == "libjemalloc.so.2"
    with pytest.raises(DataError, match=r"malloc=mimalloc: libmimalloc is not installed \(apt-get install libmimalloc2.0\)"):
        malloc.resolve("mimalloc")
    library = tmp_path / "libcustom.so"
    library.write_bytes(b"")
    assert malloc.resolve(str(library)) == str(library)
    with pytest.raises(DataError, match=r"malloc='jemaloc': expected auto, system, mimalloc, tcmalloc, jemalloc"):
        malloc.resolve("jemaloc")
    with pytest.raises(DataError, match="malloc='/no/such/lib.so'"):
        malloc.resolve("/no/such/lib.so")


def test_loaded_reads_the_process_maps(tmp_path):
    line = "7f00-7f01 r-xp 00000000 08:01 42    {}\n"
    maps = tmp_path / "maps"
    maps.write_text(line.format("/usr/lib/x86_64-linux-gnu/libc.so.6") + "7f02-7f03 rw-p 00000000 00:00 0 \n")
    assert malloc.loaded(maps_path=str(maps)) is None
    maps.write_text(maps.read_text() + line.format("/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0"))
    assert malloc.loaded(maps_path=str(maps)) == "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2.0"
    custom = tmp_path / "libmine.so"
    custom.write_bytes(b"")
    maps.write_text(line.format("/usr/lib/x86_64-linux-gnu/libc.so.6") + line.format(custom))
    assert malloc.loaded(maps_path=str(maps)) is None
    assert malloc.loaded(str(custom), maps_path=str(maps)) == str(custom)
    assert malloc.loaded(maps_path=str(tmp_path / "absent")) is None


def test_an_installed_malloc_is_found_and_really_preloads():
    library = malloc.resolve("auto")
    if library is None:
        if os.environ.get("CI"):
            pytest.fail("CI installs libmimalloc2.0 (make install), but no malloc library was found")
        pytest.skip("no mimalloc / tcmalloc / jemalloc installed (apt-get install libmimalloc2.0)")
    probe = "from train.data import malloc; print(malloc.loaded())"
    preloaded = subprocess.run([sys.executable, "-c", probe], env=dict(os.environ, LD_PRELOAD=library), capture_output=True, text=True)
    assert preloaded.returncode == 0, preloaded.stderr
    assert os.path.basename(preloaded.stdout.strip()).startswith(library.split(".so")[0])
    plain = subprocess.run([sys.executable, "-c", probe], env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, capture_output=True, text=True)
    assert plain.stdout.strip() == "None"
