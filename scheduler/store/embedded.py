"""An embedded PostgreSQL (the `pgserver` package) for running without DATABASE_URL."""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from scheduler.errors import ConfigError

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

    from scheduler.settings import Settings

log = logging.getLogger(__name__)


def database_url(settings: Settings, *, announce: bool = True) -> str:
    """DATABASE_URL, or an embedded PostgreSQL's. The daemon says so once at start
    (`announce`); a CLI command asking the same database does not repeat it."""
    if settings.database_url:
        return settings.database_url
    log.log(
        logging.WARNING if announce else logging.DEBUG,
        "DATABASE_URL is unset: using an embedded PostgreSQL in %s",
        settings.data_dir,
    )
    return start_embedded(settings.data_dir / "pgdata")


def start_embedded(data_dir: Path) -> str:
    """Start (or reuse) a PostgreSQL server whose data lives in `data_dir`; returns its URL.

    pgserver runs the server as an unprivileged user by itself when we are root, since
    PostgreSQL refuses to run as root. The server stops when the last process using it exits.
    """
    url = _server(data_dir.resolve()).get_uri()
    log.info("embedded PostgreSQL running with data in %s", data_dir)
    return url


@contextmanager
def temporary_embedded(prefix: str = "reminders-") -> Iterator[str]:
    """A throwaway embedded PostgreSQL in a new temporary folder, stopped and removed on exit;
    yields its URL."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        server = _server(data_dir)
        try:
            yield server.get_uri()
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs again
                server.cleanup()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _server(data_dir: Path) -> PostgresServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        try:
            from pgserver.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            raise ConfigError("DATABASE_URL is unset and pgserver is not installed") from exc
        try:
            return get_server(data_dir, cleanup_mode="stop")
        except Exception as exc:  # pgserver raises plain exceptions with the server's log
            raise ConfigError(
                f"could not start the embedded PostgreSQL in {data_dir}: {exc}"
            ) from exc


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy's asyncpg dialect (APScheduler's data store)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ConfigError(f"DATABASE_URL must start with postgresql://, got {url.split(':')[0]}://...")
