# The reminders daemon. Mount your plan files at /plans and point DATABASE_URL at PostgreSQL 14+
# (without it the daemon starts an embedded PostgreSQL under /data, fine for a trial only).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REMINDERS_PLANS_DIR=/plans \
    REMINDERS_DATA_DIR=/data \
    REMINDERS_API_HOST=0.0.0.0 \
    REMINDERS_API_PORT=8080

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin reminders

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scheduler ./scheduler
RUN pip install --no-cache-dir . \
    && mkdir -p /plans /data \
    && chown 10001:10001 /data
COPY --chown=10001:10001 plans /plans

USER 10001:10001
VOLUME ["/plans", "/data"]
# The HTTP API: consent ingestion, WeChat's callback, /metrics (keep it on a private network).
EXPOSE 8080

# Healthy while this replica's heartbeat in the database is fresh.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["reminders", "health"]

ENTRYPOINT ["reminders"]
CMD ["run"]
