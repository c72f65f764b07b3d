# vdm-pokemon in a container: Python 3.11, the exact pins of requirements.txt, the project,
# `dvc` on PATH, a non-root user. The default command runs `dvc repro` in /work, where you
# mount your clone (outputs and the DVC cache land in the clone, owned by the user you run as).
#
#   docker build -t vdm-pokemon .
#   docker run --rm -v "$PWD":/work --user "$(id -u):$(id -g)" vdm-pokemon
#   docker run --rm -p 8000:8000 -v "$PWD":/work vdm-pokemon vdm serve     # the demo page
#
# Targets:
#   runtime (the default: the last stage)   the image above
#   selftest                                the same image + the whole pipeline run on tiny
#                                           synthetic data during the build (the build fails if
#                                           a stage fails or an output is missing)
#
# Build arguments:
#   BASE   the base image. Default python:3.11-slim-bookworm. Any Debian/Ubuntu image works:
#          without a python3.11 the distribution's python3.11 is installed (Debian bookworm,
#          Ubuntu 22.04). For GPUs see below.
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS / PIP_CERT
#          where pip gets wheels and which CA bundle it trusts (pip reads them from the
#          environment). Default: PyPI only, the image's CA certificates. To build from local
#          wheels, lend them with a build-time volume (podman build --volume
#          /opt/wheels:/opt/wheels:ro --build-arg PIP_FIND_LINKS=/opt/wheels) or serve an index;
#          behind a TLS-intercepting proxy lend its CA bundle the same way and name it in
#          PIP_CERT. scripts/container-check.sh does both.
#
# GPUs: the pinned torch wheel is a CUDA 13.0 build and pulls the CUDA runtime, cuBLAS, cuDNN
# and NCCL as pip packages (nvidia-*), so the default image already runs on a GPU with
# `docker run --gpus all`: the NVIDIA Container Toolkit mounts the host driver (libcuda,
# nvidia-smi) into any image. Needs a host driver for CUDA 13.0 (>= 580). An nvidia/cuda base
# (`--build-arg BASE=nvidia/cuda:13.0.2-base-ubuntu22.04`; "base", not "runtime": the
# libraries come from pip anyway) adds only the toolkit's requirement check
# (NVIDIA_REQUIRE_CUDA: a too-old driver fails at `docker run` with a clear message rather
# than in torch) and its environment defaults. The ENV below sets the capabilities torch
# needs for every base.

ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${BASE} AS base

ARG DEBIAN_FRONTEND=noninteractive

# System packages: git (DVC works inside a git repository), CA certificates, npm (the
# `pokeapi` data source, which `auto` falls back to, fetches with `npm pack`), g++ (training in
# bf16 on a CPU builds its fused GroupNorm kernel, vdm/model/fused.py), Python 3.11 with
# venv when the base image has none (python:3.11 images have it in /usr/local/bin), useradd
# when a minimal base lacks it.
RUN set -eux; \
    pkgs="git ca-certificates npm g++"; \
    if ! command -v python3.11 >/dev/null 2>&1; then pkgs="$pkgs python3.11 python3.11-venv"; fi; \
    if ! command -v useradd >/dev/null 2>&1; then pkgs="$pkgs passwd"; fi; \
    apt-get update; \
    apt-get install -y --no-install-recommends $pkgs; \
    rm -rf /var/lib/apt/lists/*; \
    python3.11 --version; \
    npm --version

# A mounted clone belongs to the host user, whose uid need not be the container's: let git
# (and so DVC) use it anyway. --system: it holds whatever uid and HOME the container runs with.
RUN git config --system --add safe.directory '*'

# The requirements in their own virtual environment (no clash with the distribution's
# Python); its bin/ first on PATH gives `python` (which dvc.yaml calls), `dvc`, `pytest`.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# Where pip gets packages: pip reads these from the environment, during this step only (ARGs
# do not persist in the image). Empty values are ignored: pip then uses its own default index.
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
COPY requirements.txt /opt/vdm-pokemon/requirements.txt
RUN set -eux; \
    python3.11 -m venv "$VIRTUAL_ENV"; \
    pip install --no-cache-dir --disable-pip-version-check -r /opt/vdm-pokemon/requirements.txt; \
    python -c "import torch, torchvision; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; \
    dvc --version

# The non-root user the image runs as by default (override at run time with --user, or at
# build time with --build-arg VDM_UID=... --build-arg VDM_GID=...; not UID, which bash
# reserves). HOME is world-writable (sticky) so
# that any uid given with --user has a home for git, wandb and torch hub caches, passwd entry
# or not.
ARG VDM_UID=1000
ARG VDM_GID=1000
RUN set -eux; \
    groupadd --gid "$VDM_GID" vdm; \
    useradd --uid "$VDM_UID" --gid "$VDM_GID" --home-dir /home/vdm --create-home --shell /bin/bash vdm; \
    chmod 1777 /home/vdm; \
    mkdir -p /work; \
    chown "$VDM_UID:$VDM_GID" /work

# The project itself (a reference copy: `dvc repro` runs the code of the clone in /work), and
# its package installed, which gives the `vdm` command (generate, interpolate, serve).
COPY . /opt/vdm-pokemon
RUN pip install --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation /opt/vdm-pokemon; \
    vdm --help >/dev/null

ENV HOME=/home/vdm \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DVC_NO_ANALYTICS=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VDM_SERVE_HOST=0.0.0.0
# `docker run -p 8000:8000 -v "$PWD":/work IMAGE vdm serve` serves the demo page of /work/models
# (VDM_SERVE_HOST: inside a container the server listens on every interface).
EXPOSE 8000
# WANDB_API_KEY is never baked in: pass it at run time (`-e WANDB_API_KEY`) if you log online.

USER ${VDM_UID}:${VDM_GID}
WORKDIR /work
CMD ["dvc", "repro"]

# ---------------------------------------------------------------------------------------
# The whole pipeline (download -> preprocess -> train -> sample -> evaluate) on 60 tiny
# synthetic sprites during the build, as the non-root user, in a copy owned by root (like a
# mounted clone of another uid). `docker build --target selftest .` fails if it fails.
FROM base AS selftest
USER root
RUN cp -a /opt/vdm-pokemon /tmp/selftest && chmod -R a+rwX /tmp/selftest
USER vdm
WORKDIR /tmp/selftest
RUN bash scripts/container-selftest.sh

# ---------------------------------------------------------------------------------------
# The default target (the last stage): the image as built in `base`, without the selftest.
FROM base AS runtime
