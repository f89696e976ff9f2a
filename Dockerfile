# One image for every cnnbatch job on Kubernetes: the KubeRay head, the GPU workers and the RayJob
# submitter. TensorFlow's [and-cuda] extra ships CUDA and cuDNN as pip wheels, so a slim Python base is
# enough; the NVIDIA driver comes from the GPU node (device plugin / container toolkit).
#
#   docker build -t REGISTRY/cnnbatch:TAG .
#
# RAY_VERSION must equal rayVersion in k8s/: Ray needs the same version on every node and on the
# submitter, and KubeRay reads rayVersion to enable token auth. tests/test_k8s.py checks that they agree.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG RAY_VERSION=2.60.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# .dockerignore allow-lists these: no tests, data, .git or local credentials reach the build context.
COPY pyproject.toml README.md ./
COPY cnnbatch ./cnnbatch
COPY jobs ./jobs
# The project's own version ranges live in pyproject.toml; Ray is pinned exactly to match the manifests.
# hadolint ignore=DL3013
RUN pip install ".[gpu,s3,gcs]" "ray[default]==${RAY_VERSION}"

FROM ${PYTHON_IMAGE}
ARG RAY_VERSION=2.60.0
LABEL org.opencontainers.image.title="cnnbatch" \
      org.opencontainers.image.description="CNN features, classifier heads and bulk prediction on Ray, for GPU nodes" \
      io.ray.version="${RAY_VERSION}"
# uid/gid 1000 match runAsUser/runAsGroup in k8s/; USER is numeric so that runAsNonRoot can verify it.
RUN groupadd --gid 1000 cnnbatch \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash cnnbatch
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    KERAS_HOME=/home/cnnbatch/.keras
USER 1000:1000
WORKDIR /home/cnnbatch

# Bake the ImageNet notop weights into Keras' cache so that `--weights imagenet` works on GPU nodes without
# internet egress. --build-arg PRELOAD_IMAGENET=0 skips it (about 150 MB).
ARG PRELOAD_IMAGENET=1
RUN if [ "$PRELOAD_IMAGENET" = "1" ]; then \
      CUDA_VISIBLE_DEVICES="" python -c "import keras; \
keras.applications.VGG16(include_top=False, weights='imagenet'); \
keras.applications.InceptionV3(include_top=False, weights='imagenet')"; \
    fi

# KubeRay replaces the command with `ray start ...`; this default only documents the CLI.
CMD ["cnnbatch", "--help"]
