# The project's two images, one target each, built from the repository root (`make images`):
#
#   docker build --target node -t zstack-node:0.1.0 .             # the ZStack management node (MN)
#   docker build --target operator -t zstack-operator:0.1.0 .     # the ZStackCluster operator (kopf)
#
# Both share the builder (a wheel of the whole project) and the runtime base (that venv on the same base,
# a numeric non-root user); each target adds only its labels, port and console script.

# One pinned base for every stage (an exact patch release, never a floating tag). Without Docker Hub,
# `zstack-dev images` passes a Debian base made with mmdebstrap (devcluster/zstack_devcluster/images.py).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- builder: a wheel of the project, installed with its dependencies into /opt/venv ----------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
# Only the product's packages: the dev tools (devcluster/, bench/) are distributions of their own.
COPY pyproject.toml README.md /src/
# The dependencies first, in a layer of their own that a code change reuses. Every one ships a manylinux
# wheel (psycopg2-binary included), so no compiler is needed.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install $(python -c "import tomllib; \
print(' '.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))")
COPY node/ /src/node/
COPY operator/ /src/operator/
COPY cli/ /src/cli/
COPY kube/ /src/kube/
RUN pip wheel --no-deps --wheel-dir /wheels /src \
    && /opt/venv/bin/pip install --no-deps /wheels/*.whl

# ---- runtime: the same base, the venv only (what both targets run on) ------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /
# 65532: the conventional "nonroot" id; numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65532:65532

# ---- node: `zstack-node`, one process holding every MN service -------------------------------------
# The operator runs it as the StatefulSet <name>-mn with `command: [zstack-node]`, a numeric non-root user
# and a read-only root filesystem: the MN writes nothing to disk (its state lives in PostgreSQL, RabbitMQ
# and its Lease), and PYTHONDONTWRITEBYTECODE keeps Python from writing .pyc files.
FROM runtime AS node
LABEL org.opencontainers.image.title="zstack-node" \
      org.opencontainers.image.description="ZStack-style stateless management node: consistent-hash ring, RabbitMQ cloud bus"
# The REST API, /metrics, /healthz and /readyz (--http-port, ZSTACK_HTTP_PORT).
EXPOSE 8080
ENTRYPOINT ["zstack-node"]

# ---- operator: `zstack-operator` (kopf) -------------------------------------------------------------
# Run it with a read-only root filesystem (the Helm chart charts/zstack-operator does): the operator writes
# nothing to disk. Its state is the Kubernetes API (ZStackClusters, their children, the leader Lease),
# it logs to stdout, the in-cluster ServiceAccount token is only read, and PYTHONDONTWRITEBYTECODE keeps
# Python from writing .pyc files.
FROM runtime AS operator
LABEL org.opencontainers.image.title="zstack-operator" \
      org.opencontainers.image.description="Kubernetes operator of ZStackCluster: ZStack-style management nodes, RabbitMQ, PostgreSQL"
# /healthz (liveness), /readyz and /metrics (--http-port, ZSTACK_OPERATOR_HTTP_PORT).
EXPOSE 8081
ENTRYPOINT ["zstack-operator"]
