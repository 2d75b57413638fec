# video-gateway: `docker build -t video-gateway .`, or `docker compose up` for the whole stack.
# The config is not baked in: mount it at /config/gateway.yaml (deploy/gateway.yaml in compose).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

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

# Run unprivileged; /data holds the task store and the local provider's renders.
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /data /config \
    && chown gateway:gateway /data
USER gateway
VOLUME /data

EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]

CMD ["video-gateway", "serve", "--config", "/config/gateway.yaml"]
