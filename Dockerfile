# video-gateway: `docker build -t video-gateway .`, or `docker compose up` for the whole stack.
# The config is not baked in: mount its directory at /config, the file named gateway.yaml (deploy/
# in compose). A stop must allow for the drain: `docker stop -t 40`, `docker run --stop-timeout 40`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIDEO_GATEWAY_DATA_DIR=/data

WORKDIR /app

# Dependencies first, read from pyproject.toml alone, so that editing the code reuses this layer; at
# the versions the tests ran with (constraints.txt).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# Then the project itself, without resolving dependencies again (README.md is its long description).
COPY README.md ./
COPY gateway/ ./gateway/
RUN pip install --no-deps . \
    && rm -rf build ./*.egg-info

# Run unprivileged, by number (Kubernetes' runAsNonRoot cannot verify a user name); /data holds the
# task store and the local provider's renders: where every config that uses $VIDEO_GATEWAY_DATA_DIR,
# as the embedded default and config/gateway.yaml do, keeps them.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /config \
    && chown 10001:10001 /data
USER 10001:10001
VOLUME /data

EXPOSE 8080
# Probes the port the config gives (not always 8080), never through the environment's HTTP proxy.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["video-gateway", "healthcheck", "--config", "/config/gateway.yaml"]

CMD ["video-gateway", "serve", "--config", "/config/gateway.yaml"]
