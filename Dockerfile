# syntax=docker/dockerfile:1
#
# Dovecote container image.
#   docker build -t dovecote .
#   docker run -p 8080:8080 -v dovecote-data:/data \
#     -e DOVECOTE_PUBLIC_URL=https://relay.example.com dovecote
# DOVECOTE_PUBLIC_URL is required: the image listens on 0.0.0.0, which no client can reach,
# and the mediator's DID embeds the URL it advertises (`dovecote serve` refuses without it).
# Stage 1 builds wheels for Dovecote and every dependency; stage 2 installs them from those
# wheels only (no compiler, no network, no build tools in the final image).

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A compiler only for the rare dependency without a wheel for this platform; it stays in
# this stage, so its version does not matter (hence no pin).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# pyproject.toml names README.md as the long description, so the build needs it.
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="dovecote" \
      org.opencontainers.image.description="DIDComm v2 mediator and messaging relay" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed ids so that volume ownership, Kubernetes runAsUser/fsGroup (10001) and the image agree.
RUN groupadd --system --gid 10001 dovecote \
    && useradd --system --uid 10001 --gid dovecote --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin dovecote \
    && mkdir -p /data \
    && chown dovecote:dovecote /data \
    && chmod 0750 /data

# Install from the wheels of stage 1 without copying them into a layer. pip compiles the
# bytecode now, so nothing needs writing at run time (read-only root filesystems work).
# The versions are pinned by what stage 1 built (--no-index: nothing else is reachable).
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels dovecote

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DOVECOTE_HOST=0.0.0.0 \
    DOVECOTE_PORT=8080 \
    DOVECOTE_DATA_DIR=/data \
    DOVECOTE_LOG_FORMAT=json

# The SQLite store and the mediator's keys (identity.json) live here.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8080

# /health/live only says the process serves HTTP; readiness (store reachable, not
# draining) is for load balancers (/health/ready), not for restarting the container.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('DOVECOTE_PORT', '8080'), timeout=3)"]

# SIGTERM starts the graceful drain (not ready at once, up to DOVECOTE_SHUTDOWN_TIMEOUT=25 s
# of draining, WebSockets closed with 1012). Give `docker stop` more than that:
#   docker stop --time 35 <container>     (Kubernetes: terminationGracePeriodSeconds 40)
STOPSIGNAL SIGTERM
CMD ["dovecote", "serve"]
