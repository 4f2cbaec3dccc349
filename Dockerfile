# syntax=docker/dockerfile:1
# vaeserve images, one stage each:
#   docker build --target serve     -t vaeserve:serve .      # CPU server, no torch
#   docker build --target serve-gpu -t vaeserve:serve-gpu .  # CUDA server (onnxruntime-gpu)
#   docker build --target train     -t vaeserve:train .      # vae-train + vae-export (torch, CPU)
#   docker build --target client    -t vaeserve:client .     # vae-generate
# Dependencies are installed from the dependency lists alone, before any code is copied, so a
# code change rebuilds only the small last layers. Versions: deploy/constraints-*.txt.

# onnxruntime-gpu 1.31.1 (deploy/constraints-serve.txt) is built for CUDA 13 and cuDNN 9;
# the host needs an NVIDIA driver that supports CUDA 13 (R580 or newer).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

# ---- dependency lists, cut from pyproject.toml -----------------------------------------------
# Only these files reach the install layers: editing pyproject's tool settings, version or
# scripts leaves the lists byte-identical, and the install layers stay cached.
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /req
COPY pyproject.toml deploy/requirements.py ./
RUN python requirements.py serve > serve.txt \
 && python requirements.py serve --gpu > serve-gpu.txt \
 && python requirements.py client > client.txt \
 && python requirements.py train > train.txt

# ---- our code, as one wheel ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /wheels .

# ---- shared base of the Debian-Python images ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# One fixed uid in every image: a named volume takes the owner of the first image's mount
# point, so train (writer) and serve (reader) must agree on who owns /models.
RUN groupadd --system --gid 10001 vaeserve \
 && useradd --system --uid 10001 --gid vaeserve --create-home --home-dir /home/vaeserve vaeserve \
 && python -m venv /opt/venv \
 && install -d -o vaeserve -g vaeserve /models /runs /out

# ---- serve: onnxruntime (CPU) + grpcio; no torch ---------------------------------------------
FROM python-base AS serve
COPY --from=requirements /req/serve.txt /tmp/
COPY deploy/constraints-serve.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/serve.txt -c /tmp/constraints-serve.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl && pip check
# The server reads VAESERVE_* (server/settings.py); flags given to `docker run` still win.
ENV VAESERVE_REPOSITORY=/models \
    VAESERVE_HOST=0.0.0.0 \
    VAESERVE_PORT=8001 \
    VAESERVE_HTTP_PORT=8000 \
    VAESERVE_METRICS_PORT=8002
USER vaeserve
WORKDIR /home/vaeserve
EXPOSE 8000 8001 8002
# vae-healthcheck probes 127.0.0.1:$VAESERVE_PORT, so a moved port needs no new HEALTHCHECK.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["vae-healthcheck", "--timeout", "3"]
CMD ["vae-serve"]

# ---- serve-gpu: the same server on onnxruntime-gpu ---------------------------------------------
# Ubuntu 24.04's Python is 3.12 (22.04's 3.10 is below requires-python), hence this base.
FROM ${CUDA_IMAGE} AS serve-gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 vaeserve \
 && useradd --system --uid 10001 --gid vaeserve --create-home --home-dir /home/vaeserve vaeserve \
 && python3 -m venv /opt/venv \
 && install -d -o vaeserve -g vaeserve /models
COPY --from=requirements /req/serve-gpu.txt /tmp/
COPY deploy/constraints-serve.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/serve-gpu.txt -c /tmp/constraints-serve.txt
# --no-deps: the wheel's serve extra names onnxruntime, which would overwrite onnxruntime-gpu's
# files (both install the `onnxruntime` module).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl && pip check
ENV VAESERVE_REPOSITORY=/models \
    VAESERVE_HOST=0.0.0.0 \
    VAESERVE_PORT=8001 \
    VAESERVE_HTTP_PORT=8000 \
    VAESERVE_METRICS_PORT=8002
USER vaeserve
WORKDIR /home/vaeserve
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["vae-healthcheck", "--timeout", "3"]
# --device cuda as a flag, not VAESERVE_DEVICE: a flag wins over the environment, so a container
# without a GPU fails at start instead of serving slowly on the CPU.
CMD ["vae-serve", "--device", "cuda"]

# ---- client: vae-generate, for batch jobs against a server -------------------------------------
FROM python-base AS client
COPY --from=requirements /req/client.txt /tmp/
COPY deploy/constraints-serve.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /tmp/client.txt -c /tmp/constraints-serve.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl && pip check
USER vaeserve
WORKDIR /home/vaeserve
CMD ["vae-generate", "--help"]

# ---- train: torch (CPU build) + the train extra, for vae-train and vae-export --------------------
FROM python-base AS train
ARG TORCH_INDEX
COPY --from=requirements /req/train.txt /tmp/
COPY deploy/constraints-train.txt /tmp/
# torch alone from the CPU index (PyPI's torch pulls several GB of CUDA wheels); its own
# dependencies then resolve from PyPI under the same pins as everything else.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --index-url "${TORCH_INDEX}" -c /tmp/constraints-train.txt torch \
 && pip install -r /tmp/train.txt -c /tmp/constraints-train.txt
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install --no-deps /wheels/*.whl && pip check
USER vaeserve
WORKDIR /home/vaeserve
CMD ["vae-train", "--help"]
