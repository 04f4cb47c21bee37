# ShotStream server for a GPU host: CUDA runtime base, torch 2.13.0 (CUDA build), the `gpu`
# extra (xformers), run as a non-root user with the weights on a volume at /weights.
# Needs BuildKit: `docker build` with the buildx plugin, or DOCKER_BUILDKIT=1 with Debian's
# docker.io 20.10. No `# syntax` line: the builder's own Dockerfile frontend is used, so
# nothing is fetched from a registry but the base image.
#
#   docker build -t shotstream .
#   docker run --gpus all -p 8000:8000 --stop-timeout 30 -e SHOTSTREAM_DRAIN_GRACE_S=20 \
#     -v /srv/shotstream-weights:/weights shotstream
#
# CPU image (demo preset, bundled weights; see docker/compose.cpu.yaml):
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg EXTRAS= \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t shotstream:cpu .
#
# Behind a proxy that intercepts TLS, hand pip your CA bundle (system roots plus the proxy's)
# as a build secret; it is mounted for the pip steps only and never written to a layer:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
# A pip.conf (a private index, a local wheel server) goes the same way: --secret id=pip,src=FILE
#
# Both stages use the same base, so the virtual environment's interpreter (/usr/bin/python3)
# is the same path in the final stage.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# -- builder: a virtual environment with torch, the project and its extras -----------------
FROM ${BASE_IMAGE} AS builder
# PyPI's Linux x86_64 wheel of torch 2.13.0 is the CUDA 13.0 build (it brings its own CUDA
# libraries as nvidia-* wheels; the host needs an NVIDIA driver >= 580). For an older driver:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#   --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG EXTRAS=gpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Each pip step mounts the optional secrets `ca` (PIP_CERT) and `pip` (PIP_CONFIG_FILE).
# torch alone first: the largest layer, rebuilt only when the pin changes. The project's
# torch requirement is then already met (a local tag such as +cu128 or +cpu matches it).
RUN --mount=type=secret,id=ca --mount=type=secret,id=pip \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -f /run/secrets/pip ]; then export PIP_CONFIG_FILE=/run/secrets/pip; fi \
 && pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0
# The dependencies from pyproject alone (an empty project, a placeholder README), so that a
# change to the code does not reinstall them.
COPY pyproject.toml /app/
RUN --mount=type=secret,id=ca --mount=type=secret,id=pip \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -f /run/secrets/pip ]; then export PIP_CONFIG_FILE=/run/secrets/pip; fi \
 && touch /app/README.md \
 && pip install "/app${EXTRAS:+[$EXTRAS]}"
COPY . /app
# Editable: the code stays at /app (with the web client beside it), the venv points there.
RUN --mount=type=secret,id=ca --mount=type=secret,id=pip \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -f /run/secrets/pip ]; then export PIP_CONFIG_FILE=/run/secrets/pip; fi \
 && pip install --no-deps --no-compile -e /app

# -- final: the runtime base, python3, the venv and the code; no compilers, no pip caches ----
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 shotstream \
 && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin shotstream \
 && mkdir -p /weights \
 && chown 10001:10001 /weights
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
# The drain on SIGTERM must end before the platform's stop timeout kills the process: 5 s of
# grace, then up to 2.5 s for `ended` to reach the clients and a few for shutdown, fits a
# plain `docker stop` (10 s). With a longer stop timeout (`docker run --stop-timeout 30`,
# compose's stop_grace_period) raise it: SHOTSTREAM_DRAIN_GRACE_S=20.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SHOTSTREAM_HOST=0.0.0.0 \
    SHOTSTREAM_PORT=8000 \
    SHOTSTREAM_PRESET=wan2.1-1.3b \
    SHOTSTREAM_WEIGHTS=/weights \
    SHOTSTREAM_DOWNLOAD=0 \
    SHOTSTREAM_DRAIN_GRACE_S=5
WORKDIR /app
USER 10001:10001
# Real weights: mount a folder filled by `shotstream download` here, or set
# SHOTSTREAM_DOWNLOAD=1 to fetch them on first start (see docker/entrypoint.sh).
VOLUME ["/weights"]
EXPOSE 8000
# Liveness only: /healthz answers while the weights load; readiness is /readyz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SHOTSTREAM_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["shotstream", "serve"]
