# syntax=docker/dockerfile:1
# The trimtab operator image (also runs `trimtab gpu-agent`): two stages, so the runtime has
# no compiler, pip cache or build context; it runs as uid 65532 on a read-only root filesystem.
#
#   docker build -t ghcr.io/trimtab/trimtab:0.1.0 .
#
# Dependencies come from requirements.lock (exact versions); refresh it as its header says.

FROM python:3.11.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/trimtab
# The lock first: this layer is rebuilt only when a dependency changes, not on every code edit.
COPY requirements.lock ./
RUN /opt/trimtab/bin/pip install --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY operator/ ./operator/
# The build backend is pinned too and lives in its own venv, so it never reaches the runtime.
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install setuptools==84.2.1 wheel==0.48.0 \
    && /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .
# --no-deps: everything trimtab needs is already pinned above; `pip check` fails the build if
# the lock no longer satisfies pyproject.toml.
RUN /opt/trimtab/bin/pip install --no-deps /wheels/trimtab-*.whl \
    && /opt/trimtab/bin/pip check \
    && /opt/trimtab/bin/python -m compileall -q /opt/trimtab/lib

FROM python:3.11.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="trimtab" \
      org.opencontainers.image.description="Kubernetes operator that keeps ML workloads on their SLOs at the lowest cost" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/trimtab/trimtab"
# A fixed numeric user, so Kubernetes can verify runAsNonRoot without reading /etc/passwd.
RUN groupadd --system --gid 65532 trimtab \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin trimtab
COPY --from=build /opt/trimtab /opt/trimtab
ENV PATH=/opt/trimtab/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8080 8081
ENTRYPOINT ["trimtab"]
CMD ["run", "--all-namespaces"]
