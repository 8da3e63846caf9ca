# forge_dist on the official TensorFlow image (CPU), with Open MPI and Horovod built by
# the same script `make setup` runs (scripts/build-horovod.sh: the one workaround, in one
# place). Build from the repository root, and run scripts/train.py:
#
#   docker build -t forge-dist .
#   docker run --rm -v "$PWD/runs:/runs" forge-dist --checkpoint-dir /runs/exp1 --epochs 5
#   docker run --rm --entrypoint mpirun forge-dist -np 2 --oversubscribe \
#       python scripts/train.py --backend mpi --checkpoint-dir /runs/exp1
#
# TF_VERSION must match the [tf] extra in pyproject.toml (tests/test_dockerfile.py checks).
ARG TF_VERSION=2.21.0
FROM tensorflow/tensorflow:${TF_VERSION}
ARG TF_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# A compiler and CMake for Horovod's build; python3-venv for the virtual environment.
# Versions are whatever the base image's Ubuntu release ships.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make python3-venv \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/forge_dist
COPY pyproject.toml README.md ./
COPY forge_dist ./forge_dist
COPY scripts ./scripts
COPY slurm ./slurm

# The image's TensorFlow, seen from a virtual environment; tf_keras at the same version;
# forge_dist with its [s3,mpi] extras (the [mpi] extra brings Open MPI's wheel, as in
# `make setup`).
RUN python3 -m venv --system-site-packages .venv \
    && .venv/bin/pip install --no-cache-dir "tf-keras==${TF_VERSION}" ".[s3,mpi]"
RUN FORGE_DIST_CACHE=/tmp/forge-dist-cache scripts/build-horovod.sh \
    && rm -rf /tmp/forge-dist-cache

RUN useradd --create-home --uid 1000 forge
USER 1000
ENV PATH=/opt/forge_dist/.venv/bin:$PATH \
    OMP_NUM_THREADS=1 \
    TF_CPP_MIN_LOG_LEVEL=3
ENTRYPOINT ["python", "scripts/train.py"]
CMD ["--help"]
