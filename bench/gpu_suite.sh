#!/usr/bin/env bash
# Every GPU number ce-ray claims, in one prepared run on the lent GPU machine (see bench/gpu_suite.py).
#
#   bash bench/gpu_suite.sh [--dry-run] [--model DIR] [--data DIR] [--only part,part]
#   bash bench/gpu_suite.sh --install-only        # install carried wheels (.whl/) into .site/ and stop
#
# The device machine (Python 3.12 with torch/transformers/sentence-transformers, no network) lacks Ray
# and the bundled model, and one call carries at most 64 MiB: the wheels (48 MiB, from
# `bash ../shared/device/make_wheels.sh --serve .whl`) and the data + fp16 model (50 MiB, from
# `python bench/gpu_suite.py --pack .gpu`) go in two calls to the same warm machine (.site/ is an
# ignored build output, so it stays there between calls):
#   call 1, carry [".whl"]:  bash bench/gpu_suite.sh --install-only
#   call 2, carry [".gpu"]:  bash bench/gpu_suite.sh --data .gpu/data --model .gpu/model
# Results: $OUT/gpu_suite.json and $OUT/gpu_suite.md (runs/gpu-suite/ when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
fi
[ "${1:-}" = "--install-only" ] && { echo "installed into .site/"; exit 0; }
if [ -d .site ]; then
  export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$PWD/.site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_suite.py "$@"
