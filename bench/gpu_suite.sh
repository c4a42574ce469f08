#!/usr/bin/env bash
# Every GPU number ce-ray claims, in one prepared run on the lent GPU machine (see bench/gpu_suite.py).
#
#   bash bench/gpu_suite.sh [--dry-run] [--model DIR] [--data DIR] [--only part,part]
#
# On the device machine (Python 3.12 with torch/transformers/sentence-transformers, no network), carry
# the wheels from `bash ../shared/device/make_wheels.sh --serve .whl` and a folder with the data
# (nli/ and qa/ of ../shared/data) and the model, e.g. .gpu/ (see bench/README.md, "GPU suite"):
#   run: bash bench/gpu_suite.sh --data .gpu/data --model .gpu/model      carry: [".whl", ".gpu"]
# Results: $OUT/gpu_suite.json and $OUT/gpu_suite.md (default runs/gpu-suite/ when OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import ray" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" bench/gpu_suite.py "$@"
