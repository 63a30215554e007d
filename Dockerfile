# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target server  -t uqserve-triton:0.1.0  .   # Triton (GPU) serving the default bundle
#   docker build --target sidecar -t uqserve-sidecar:0.1.0 .   # DICOM sidecar: uqserve + dicom extra, no torch
#
# The NGC tag matches the tritonclient this project is tested with (2.73 = 26.08);
# it knows the ensemble field max_inflight_requests that the repository uses.

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.08-py3

# --- repository: write the onnxruntime-flavour model repository from the shipped bundle ---
FROM ${PYTHON_IMAGE} AS repository
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY uqserve ./uqserve
# Plain install (no extras): writing a repository needs tritonclient and onnxruntime, not torch.
RUN pip install --no-cache-dir . \
    && uqserve repo softmax-ensemble --out /models --flavour onnxruntime

# --- server: Triton with the onnxruntime and python backends, on GPU ---
FROM ${TRITON_IMAGE} AS server
COPY --from=repository /models /models
EXPOSE 8000 8001 8002
# Ready = every model of the repository loaded (strict readiness).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# Run with a large /dev/shm (docker run --shm-size=1g ...): the default 64 MB is too small.
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", "--allow-gpu-metrics=true"]

# --- sidecar: DICOM in, DICOM SEG + uncertainty maps out; talks to the server over gRPC ---
FROM ${PYTHON_IMAGE} AS sidecar
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY uqserve ./uqserve
# The project itself, not a registry package: its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[dicom]" \
    && useradd --create-home --uid 10001 uqserve \
    && mkdir -p /spool && chown uqserve /spool
USER 10001
WORKDIR /home/uqserve
VOLUME ["/spool"]
EXPOSE 11112
ENTRYPOINT ["uqserve", "sidecar"]
CMD ["--listen", "0.0.0.0:11112", "--spool", "/spool", "--server", "grpc://triton:8001"]
