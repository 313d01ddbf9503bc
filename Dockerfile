# hpsearch: one image for the API server, the workers and the one-shot migration.
#
#   docker build -t hpsearch:latest .                       # CUDA PyTorch from PyPI (GPU nodes)
#   docker build -t hpsearch:cpu \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .   # CPU-only, much smaller
#
# The default command serves the REST API on 0.0.0.0:8000; workers and the migration run the
# same image with another command (see docker-compose.yml).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with PyTorch, the dependencies and hpsearch
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# Which PyTorch, and from where. The default range, from PyPI, is the CUDA build on Linux x86_64.
ARG TORCH_SPEC="torch>=2.4,<3"
# An extra index for PyTorch only, e.g. https://download.pytorch.org/whl/cpu; empty: PyPI.
ARG TORCH_INDEX=""
# Extras of the hpsearch package to install (comma-separated; empty for none).
ARG EXTRAS="mnist"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH

# PyTorch first, in its own layer: it is by far the largest download and changes least.
RUN if [ -n "$TORCH_INDEX" ]; then \
        pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi

WORKDIR /src

# The other dependencies, read from pyproject.toml, so that a change of the code alone
# does not download them again.
COPY pyproject.toml ./
RUN python -c "import os, tomllib; \
project = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extras = [e.strip() for e in os.environ.get('EXTRAS', '').split(',') if e.strip()]; \
print('\n'.join(project['dependencies'] + [r for e in extras for r in project['optional-dependencies'][e]]))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

# hpsearch itself (not editable: the runtime stage copies only /opt/venv).
COPY README.md ./
COPY hpsearch ./hpsearch
COPY api ./api
COPY storage ./storage
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && pip check

# ---------------------------------------------------------------------------------------------
# runtime: slim Python, the virtual environment, a non-root user
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="hpsearch" \
      org.opencontainers.image.description="Hyperparameter search for BP networks: REST API, workers, migrations"

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HPSEARCH_DATA_DIR=/data \
    HOME=/home/hpsearch \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# A numeric user, so that Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 hpsearch \
    && useradd --system --uid 10001 --gid hpsearch --home-dir /home/hpsearch --create-home \
        --shell /usr/sbin/nologin hpsearch \
    && mkdir -p /data \
    && chown hpsearch:hpsearch /data

COPY --from=builder /opt/venv /opt/venv
COPY examples /app/examples

USER 10001:10001
# File datasets and, without HPSEARCH_DATABASE_URL, the SQLite database hpsearch.db live here.
WORKDIR /data

EXPOSE 8000

# /healthz answers 200 when the API server and its database answer; urllib raises on a 503.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/healthz', timeout=5).status != 200)"]

CMD ["hpsearch", "serve", "--host", "0.0.0.0", "--port", "8000"]
