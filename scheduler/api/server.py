"""Serving the API inside the daemon's event loop (uvicorn), under the daemon's own signals."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from scheduler.errors import ConfigError


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The daemon handles SIGTERM/SIGINT itself and stops the server in order.
        yield


class ApiServer:
    def __init__(self, app: FastAPI, host: str, port: int):
        self.host, self.requested_port = host, port
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_level="warning", access_log=False
        )
        self._server = _Server(config)
        self._socket: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Bind here rather than in uvicorn, which exits the process when it cannot bind.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"the HTTP API cannot listen on {self.host}:{self.requested_port}: "
                f"{exc.strerror} (set REMINDERS_API_HOST / REMINDERS_API_PORT)"
            ) from None
        self._socket = sock
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not self._task.done():  # noqa: ASYNC110 - a flag
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        assert self._socket is not None
        port: int = self._socket.getsockname()[1]
        return port

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        if self._socket is not None:
            self._socket.close()
