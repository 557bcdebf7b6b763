# syntax=docker/dockerfile:1
# numbersvc: the gRPC server over Plivo's phone-number groups, as a container image.
#
#   docker build -t numbersvc:1.0.0 .
#   docker run --rm -p 50051:50051 -v numbersvc-ledger:/var/lib/numbersvc --stop-timeout 30 \
#     -e PLIVO_AUTH_ID -e PLIVO_AUTH_TOKEN numbersvc:1.0.0
#
# Without PLIVO_AUTH_ID and PLIVO_AUTH_TOKEN the server runs on its embedded sandbox and says
# so loudly. deploy/README.md explains the shutdown arithmetic behind --stop-timeout 30 (Docker's
# default of 10 s is shorter than the drain and grace periods). tests/deploy checks this file.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the package and its dependencies under /install --------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
# Only what `pip install .` reads: the generated stubs are committed inside the package, so
# neither protoc nor protos/ is needed. README.md is the package's long description.
COPY pyproject.toml README.md ./
COPY numbersvc ./numbersvc
RUN pip install --no-cache-dir --disable-pip-version-check --root-user-action=ignore \
        --prefix=/install .

# --- runtime: the same Python, the installed tree, a non-root user ----------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="numbersvc" \
      org.opencontainers.image.description="gRPC service over Plivo's phone-number groups"
# /install mirrors /usr/local: site-packages and the `numbersvc` console script, so the script
# is on the default PATH and its shebang (/usr/local/bin/python) is this image's Python.
COPY --from=build /install /usr/local
# A fixed numeric uid and gid, so Kubernetes' runAsNonRoot can verify the user (it cannot
# resolve names) and a volume's owner is the same in every image built from this file.
RUN groupadd --system --gid 10001 numbersvc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin numbersvc \
    && mkdir -p /var/lib/numbersvc \
    && chown 10001:10001 /var/lib/numbersvc
# Only numbersvc settings here (tests/deploy checks every name against numbersvc.config).
ENV NUMBERSVC_LISTEN=0.0.0.0:50051 \
    NUMBERSVC_LEDGER_PATH=/var/lib/numbersvc/ledger.sqlite3
# The order ledger (SQLite and its -wal/-shm files): the record of money spent, keep it.
VOLUME ["/var/lib/numbersvc"]
USER 10001:10001
EXPOSE 50051
# The server turns SIGTERM into: health NOT_SERVING, drain, grace for calls, rent drain.
STOPSIGNAL SIGTERM
# The standard gRPC health service, asked by the grpcio already in the image (no probe binary),
# for the service itself: NOT_SERVING (shutting down) or no answer within 2 s is unhealthy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;p=os.environ.get('NUMBERSVC_LISTEN','0.0.0.0:50051').rpartition(':')[2];r=g.HealthStub(grpc.insecure_channel('127.0.0.1:'+p)).Check(h.HealthCheckRequest(service='numbersvc.v1.NumberGroupService'),timeout=2);sys.exit(r.status!=h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["numbersvc", "serve"]
