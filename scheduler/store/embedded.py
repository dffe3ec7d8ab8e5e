"""An embedded PostgreSQL (the `pgserver` package) for running without DATABASE_URL."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from scheduler.errors import ConfigError

log = logging.getLogger(__name__)


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in `data_dir`; returns its URL.

    pgserver runs the server as an unprivileged user by itself when we are root, since
    PostgreSQL refuses to run as root. The server stops when the last process using it exits.
    """
    try:
        import pgserver
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ConfigError("DATABASE_URL is unset and pgserver is not installed") from exc
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises plain exceptions with the server's log
            raise ConfigError(
                f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
            ) from exc
    url = server.get_uri()
    log.info("embedded PostgreSQL running with data in %s", data_dir)
    return url


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy's asyncpg dialect (APScheduler's data store)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ConfigError(f"DATABASE_URL must start with postgresql://, got {url.split(':')[0]}://...")
