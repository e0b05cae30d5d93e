"""One upstream MCP server (stdio or streamable HTTP), held connected by a supervisor task: when the connection
breaks (the process exited, the server went away), calls in flight fail as upstream errors and the supervisor
reconnects with backoff. The tool list is read at connect and every ``refresh_every`` seconds after; agents' listings
and calls are answered from it (an upstream round trip per agent listing would double the cost of every call, as
the MCP server checks each call's ``Mcp-Param`` headers against the tool's schema)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from custody.gateway.config import UpstreamConfig

__all__ = ["Upstream", "UpstreamError"]

log = logging.getLogger("custody.gateway")
_BROKEN = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, ConnectionError, OSError)


class UpstreamError(Exception):
    """The call did not get a result from the upstream: not connected, the connection broke, a timeout, or an MCP
    error in place of a result."""


class Upstream:
    def __init__(self, config: UpstreamConfig, *, connect_wait: float = 10.0, refresh_every: float = 30.0) -> None:
        self.config = config
        self.name = config.name
        self.tools: dict[str, types.Tool] = {}
        self.error: str | None = "not connected yet"
        self._client: Client | None = None
        self._ready = anyio.Event()
        self._lost = anyio.Event()
        self._connect_wait = connect_wait
        self._refresh_every = refresh_every

    async def run(self) -> None:
        """Keep the upstream connected until cancelled."""
        backoff = 0.2
        while True:
            try:
                async with self._connect() as client:
                    self._client = client
                    await self.refresh()
                    self.error = None
                    self._ready.set()
                    backoff = 0.2
                    log.info("upstream %s connected: %d tools", self.name, len(self.tools))
                    while not self._lost.is_set():
                        with anyio.move_on_after(self._refresh_every):
                            await self._lost.wait()
                        if not self._lost.is_set():
                            await self.refresh()
            except Exception as exc:  # any failure to connect or of the connection: reconnect
                self.error = _describe(exc)
                log.warning("upstream %s: %s; reconnecting in %.1f s", self.name, self.error, backoff)
            finally:
                self._client = None
                self._ready = anyio.Event()
                self._lost = anyio.Event()
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    @asynccontextmanager
    async def _connect(self) -> AsyncIterator[Client]:
        config = self.config
        if config.command is not None:
            parameters = StdioServerParameters(
                command=config.command[0], args=config.command[1:], env=config.env or None, cwd=config.cwd
            )
            async with Client(parameters, cache=None, read_timeout_seconds=config.timeout_seconds) as client:
                yield client
        else:
            assert config.url is not None
            timeout = httpx2.Timeout(config.timeout_seconds, connect=10.0)
            async with (
                httpx2.AsyncClient(headers=config.headers, timeout=timeout) as http,
                Client(
                    streamable_http_client(config.url, http_client=http),
                    cache=None,
                    read_timeout_seconds=config.timeout_seconds,
                ) as client,
            ):
                yield client

    async def ready(self, timeout: float) -> bool:
        with anyio.move_on_after(timeout):
            await self._ready.wait()
        return self._client is not None

    async def refresh(self) -> None:
        """Read the upstream's whole tool list (every page)."""
        client = self._client
        if client is None:
            return
        tools: dict[str, types.Tool] = {}
        cursor: str | None = None
        for _ in range(1000):  # a server that pages forever gets 1,000 pages
            result = await client.list_tools(cursor=cursor)
            tools.update((tool.name, tool) for tool in result.tools)
            cursor = result.next_cursor
            if not cursor:
                break
        self.tools = tools

    async def call(self, name: str, arguments: dict[str, Any], meta: dict[str, Any]) -> types.CallToolResult:
        if self._client is None and not await self.ready(self._connect_wait):
            raise UpstreamError(f"upstream {self.name} is not connected: {self.error}")
        client = self._client
        assert client is not None
        try:  # the client's read_timeout_seconds bounds the wait
            return await client.call_tool(name, arguments, meta=meta)  # type: ignore[arg-type]
        except TimeoutError as exc:
            raise UpstreamError(f"upstream {self.name} did not answer within {self.config.timeout_seconds} s") from exc
        except _BROKEN as exc:
            self._lost.set()
            raise UpstreamError(f"upstream {self.name}: {_describe(exc)}") from exc
        except MCPError as exc:
            if exc.error.code == types.CONNECTION_CLOSED:
                self._lost.set()
            raise UpstreamError(f"upstream {self.name}: {exc.error.message}") from exc

    def lose(self) -> None:
        self._lost.set()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
