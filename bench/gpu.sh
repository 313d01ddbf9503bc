#!/usr/bin/env bash
# Everything hpsearch wants to know from a GPU node, in one command: the CUDA tests,
# throughput and a real worker (bench/gpu.py says what and how; this only sets up Python).
#
# Usage: bash bench/gpu.sh [--out DIR] [--dry-run] [--limit-s 480]
#
# Python: the repository's .venv where there is one (a developer's machine, CI); else, on a
# GPU node without a package index, python3 with the wheels of .whl/ (made by
# bench/gpu_wheels.sh where pip reaches an index) installed beside it in /tmp/hpsearch-site,
# and the repository on PYTHONPATH, since it is not installed there. .venv comes first
# because the wheels are for CPython 3.12 on x86-64 and may not fit a developer's Python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --limit-s counts from here, the wheels' installation included.
HPSEARCH_GPU_STARTED="$(date +%s.%N)"
export HPSEARCH_GPU_STARTED
export PYTHONUNBUFFERED=1

if [ -x .venv/bin/python ]; then
    python=.venv/bin/python
elif [ -d .whl ]; then
    site=/tmp/hpsearch-site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python=python3
else
    python=python3
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" bench/gpu.py "$@"
