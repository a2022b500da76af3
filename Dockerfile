# syntax=docker/dockerfile:1
# The dispatcher image: one image for every role (api, worker, scheduler, sandbox SMTP,
# migrations); docker-compose.yml picks the command. Runs as a non-root user.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libspandsp2: fax (T.4/T.30) support for the fax channel; Pango, HarfBuzz's subsetter and
# DejaVu Sans: WeasyPrint's text layout and the fax font (Latin and Cyrillic), see
# scripts/ensure-system-deps.sh; tini reaps and forwards signals.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libspandsp2 \
       libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz-subset0 fonts-dejavu-core tini \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid dispatcher --home-dir /var/lib/dispatcher \
        --no-create-home --shell /usr/sbin/nologin dispatcher \
    && mkdir -p /var/lib/dispatcher/sandbox/mail \
    && chown -R dispatcher:dispatcher /var/lib/dispatcher

WORKDIR /app

# The package first (its layer changes less often than config and templates).
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
RUN pip install --no-compile . && rm -rf /app/dispatcher /app/build /app/*.egg-info

# Data the service reads at run time; settings fall back to the working directory for these.
COPY config ./config
COPY templates ./templates

ENV DISPATCH_CONFIG_DIR=/app/config \
    DISPATCH_TEMPLATES_DIR=/app/templates \
    DISPATCH_VAR_DIR=/var/lib/dispatcher \
    DISPATCH_MODE=sandbox

USER dispatcher:dispatcher
EXPOSE 8080 2525
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["dispatcher", "api", "--host", "0.0.0.0", "--port", "8080"]
