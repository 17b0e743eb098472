# stickyproxy as a container: the sticky WebDriver proxy on 8910, its stats and /healthz on 8911.
#
#   docker build -t stickyproxy .
#   docker run --rm -p 8910:8910 -p 8911:8911 stickyproxy                      # 2 local PhantomJS
#   docker run --rm -p 8910:8910 stickyproxy serve --backend http://phantomjs-1:8910 ...
#
# The image carries PhantomJS (the `phantomjs` extra), so `--local N` works inside it. To launch
# PhantomJS containers instead (`--docker N`), mount the Docker socket: see
# deploy/docker-compose.launcher.yml.
#
# BASE_IMAGE: any Debian-like image with python3 >= 3.11 and its venv module. The default comes from
# Docker Hub; the tests build a local one (tests/dockerengine.py) and pass
# `--build-arg BASE_IMAGE=stickyproxy-test/python:3.11`.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    OPENSSL_CONF=/dev/null \
    PATH=/opt/stickyproxy/bin:$PATH

# PhantomJS links libstdc++ and fontconfig/freetype and needs one font; skipped when the base has them.
RUN if ! ls /usr/lib/*/libfontconfig.so.1 /usr/lib/*/libstdc++.so.6 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends libstdc++6 libfontconfig1 fonts-dejavu-core \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY stickyproxy ./stickyproxy
# A venv: works the same on python:3.11-slim and on Debian's python3 (PEP 668 forbids a system
# pip install there). The wheel ships PhantomJS without its run bit: set it once here, so a
# non-root user never needs a writable cache for a runnable copy.
RUN python3 -m venv /opt/stickyproxy \
    && /opt/stickyproxy/bin/pip install ".[phantomjs]" \
    && phantomjs=$(/opt/stickyproxy/bin/python -c "import phantomjs_bin; print(phantomjs_bin.executable_path)") \
    && chmod 0755 "$phantomjs" \
    && ln -s "$phantomjs" /opt/stickyproxy/bin/phantomjs \
    && rm -rf /src

WORKDIR /tmp
# Non-root by number: no passwd entry needed, so it works on minimal bases too. PhantomJS writes
# its local storage under $HOME.
ENV HOME=/tmp
USER 10001:10001

EXPOSE 8910 8911
# Python, not curl: the slim base has no curl. Follows --stats-listen's port via STATS_PORT.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('STATS_PORT', '8911'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["stickyproxy"]
CMD ["serve"]
