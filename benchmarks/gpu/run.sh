#!/usr/bin/env bash
# GPU acceptance in one call (docs/benchmarks.md, "GPU acceptance"):
#   bash benchmarks/gpu/run.sh [--cpu-smoke] [--out DIR] [--budget-s S] [--only PART,...]
# On the GPU machine it first installs the wheels `make gpu-wheels` left in .whl/ (what its image
# lacks) into a private folder; then every part runs in a process of its own with its own time
# budget, and results.json + results.md land in DIR ($OUT when set, else runs/gpu-acceptance).
# --cpu-smoke runs the same parts on tiny sizes on this machine's CPU (the CI test does).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-runs/gpu-acceptance}
args=()
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [[ " ${args[*]-} " != *" --cpu-smoke "* ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec python3 benchmarks/gpu/run.py --out "$out" ${args[@]+"${args[@]}"}
