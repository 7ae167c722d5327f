#!/usr/bin/env bash
# make gpu-wheels: the wheels of benchmarks/gpu/wheels.txt, each at the version installed here,
# for the GPU machine's Python 3.12 (x86-64 manylinux), into .whl/ (git-ignored; the device call
# carries it). A package published as source only (antlr4) is built into a wheel here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
DEST=${DEST:-.whl}
mkdir -p "$DEST"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
while read -r name; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") ||
    { echo "error: $name is not installed here (make install first)" >&2; exit 2; }
  if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${platforms[@]}" -d "$DEST" "$name==$version" 2>/dev/null; then
    "$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$name==$version"  # pure-Python source release
  fi
  echo "  $name==$version"
done < <(grep -v '^\s*\(#\|$\)' benchmarks/gpu/wheels.txt)
du -sh "$DEST"
