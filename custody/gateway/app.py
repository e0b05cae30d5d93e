"""The gateway: an MCP server (streamable HTTP, the official ``mcp`` SDK) in front of upstream MCP servers.

Per ``tools/call``: authenticate the bearer token (``JwtVerifier``), decide default-deny (``policy.decide``),
forward only an allowed call, and record one signed event through the custody-sdk spool, allow or deny, with the
delegation chain, the credential, the tool, the resource, the decision and the outcome. With ``failure_mode =
"closed"`` an allowed call is forwarded only once the spool has given room for its event (``Emitter.reserve``):
no audit, no action. ``tools/list`` shows a caller only the tools it may call.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import httpx
import mcp_types as types
from custody_sdk import Emitter, LogMisbehaved, Reservation, SpoolFull
from mcp import MCPError
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from custody.gateway.auth import MAX_NAME, InvalidToken, JwtVerifier, Principal
from custody.gateway.config import GatewayConfig, Policy
from custody.gateway.policy import Decision, decide, visible
from custody.gateway.revocations import Revocations
from custody.gateway.upstream import Upstream, UpstreamError

__all__ = ["META_EVENT_ID", "META_PARENT", "META_TRACE", "Gateway", "build_app"]

log = logging.getLogger("custody.gateway")

# Request _meta keys an agent may send, and the one every result carries (docs/gateway.md).
META_TRACE = "custody/trace_id"
META_PARENT = "custody/parent_event_id"
META_EVENT_ID = "custody/event_id"
META_DECISION = "custody/decision"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_LOOPBACK = {"127.0.0.1", "::1"}
_ERROR_TEXT = 2000  # of an upstream error kept in the event's attrs (the rest is counted, not dropped silently)


@dataclass
class Counters:
    allowed: int = 0
    denied: int = 0
    refused: int = 0  # allowed by policy, refused because the spool could not take the event (closed mode)
    unaudited: int = 0  # calls whose event could not be spooled (open mode, or a deny)
    upstream_errors: int = 0
    overhead_us: list[int] = field(default_factory=list)  # the gateway's own time per allowed call, recent ones


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        policy: Policy,
        verifier: JwtVerifier,
        emitter: Emitter,
        upstreams: list[Upstream],
        revocations: Revocations | None = None,
    ) -> None:
        self.config, self.policy, self.verifier, self.emitter = config, policy, verifier, emitter
        self.revocations = revocations
        self.upstreams = {upstream.name: upstream for upstream in upstreams}
        self.tenant = config.custody.tenant
        self.counters = Counters()

    # -- the MCP handlers ---------------------------------------------------------------------------------------

    async def list_tools(
        self, ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        principal = await self._principal(ctx)
        offered: dict[str, list[tuple[str, types.Tool]]] = {}
        for upstream in self.upstreams.values():
            for tool in upstream.tools.values():
                offered.setdefault(tool.name, []).append((upstream.name, tool))
        tools = []
        for name, offers in sorted(offered.items()):
            callable_offers = [tool for server, tool in offers if visible(self.policy, principal, name, server)]
            if len(callable_offers) == 1:  # offered twice with no server named: a call would be denied
                tools.append(callable_offers[0])
        return types.ListToolsResult(tools=tools)

    async def call_tool(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        started = time.perf_counter()
        principal = await self._principal(ctx)
        tool = _checked_name(params.name, "the tool name")
        arguments = params.arguments or {}
        links = _links(ctx.meta)
        offered_by = [name for name, upstream in self.upstreams.items() if tool in upstream.tools]
        decision = decide(self.policy, principal, tool, arguments, offered_by, self.tenant)
        credential = principal.credential["id"]
        if self.revocations is not None and credential in self.revocations:
            reason = f"credential {credential} was revoked (Custody's log)"
            decision = replace(decision, result="deny", reason=reason)
        event_id = str(uuid.uuid4())
        fields = self._event(event_id, principal, tool, decision, links)
        if decision.result == "deny":
            self.counters.denied += 1
            await self._record_unreserved(fields)
            return _result(f"denied by policy {self.policy.name}: {decision.reason}", event_id, "deny", error=True)

        reservation = await self._reserve()
        if reservation is None and self.config.failure_mode == "closed":
            self.counters.refused += 1
            return _result(
                "refused: the audit spool cannot take this call's event (failure_mode closed: no audit, no action)",
                None,
                "refused",
                error=True,
            )
        assert decision.server is not None
        upstream = self.upstreams[decision.server]
        meta = {META_EVENT_ID: event_id, **({META_TRACE: links["trace_id"]} if "trace_id" in links else {})}
        upstream_started = time.perf_counter()
        # Once forwarded, the call is recorded whatever happens next: an agent that goes away mid-call cancels this
        # task, and the record is then written under a shield, its outcome an error saying so.
        fields["outcome"] = "error"
        fields["attrs"] = {"error": "the agent's request ended before the upstream answered"}
        try:
            result = await upstream.call(tool, arguments, meta)
            fields["outcome"] = "error" if result.is_error else "success"
            del fields["attrs"]
        except UpstreamError as exc:
            self.counters.upstream_errors += 1
            fields["attrs"] = {"error": _clipped(str(exc))}
            result = types.CallToolResult(content=[types.TextContent(type="text", text=str(exc))], is_error=True)
        finally:
            upstream_seconds = time.perf_counter() - upstream_started
            self.counters.allowed += 1
            with anyio.CancelScope(shield=True):
                await self._record_allowed(fields, reservation)
        overhead = time.perf_counter() - started - upstream_seconds
        self._note_overhead(overhead)
        result.meta = {**(result.meta or {}), META_EVENT_ID: event_id, META_DECISION: "allow"}
        return result

    def input_schema(self, tool: str) -> dict[str, Any] | None:
        """The schema of the tool a call names, for the MCP server's ``Mcp-Param`` header check: from the upstream
        the policy sends it to (or the one upstream offering it)."""
        rule = self.policy.rule(tool)
        offers = [
            upstream.tools[tool]
            for upstream in self.upstreams.values()
            if tool in upstream.tools and (rule is None or rule.server in (None, upstream.name))
        ]
        return offers[0].input_schema if len(offers) == 1 else None

    # -- parts --------------------------------------------------------------------------------------------------

    async def _principal(self, ctx: ServerRequestContext[Any, Any]) -> Principal:
        request = ctx.request
        user = getattr(request, "user", None) if request is not None else None
        if not isinstance(user, AuthenticatedUser):  # the bearer middleware lets nothing else through
            raise MCPError(types.INVALID_REQUEST, "no authenticated caller")
        try:
            _, principal = await self.verifier.authenticate(user.access_token.token)
        except InvalidToken as exc:  # expired since the middleware checked it
            raise MCPError(types.INVALID_REQUEST, f"the bearer token is no longer valid: {exc}") from exc
        return principal

    def _event(
        self, event_id: str, principal: Principal, tool: str, decision: Decision, links: dict[str, str]
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "event_id": event_id,
            "type": "tool.invocation",
            "delegation": principal.delegation,
            "credential": principal.credential,
            "tool": {"name": tool, "server": decision.server or "(no upstream)"},
            "decision": decision.event_field(self.policy),
            **links,
        }
        if decision.resource is not None:
            fields["resource"] = decision.resource
        return fields

    async def _reserve(self) -> Reservation | None:
        """Room for the call's event, and the chain head it will follow (known once Custody was reachable)."""

        def reserve() -> Reservation:
            self.emitter.chain_head()
            return self.emitter.reserve()

        try:
            if self.emitter.resumed:  # a lock and a sum: no I/O, no thread needed
                return self.emitter.reserve()
            return await anyio.to_thread.run_sync(reserve)
        except (SpoolFull, OSError, httpx.HTTPError) as exc:
            log.error("the audit spool cannot take events: %s", exc)
            return None

    async def _record_allowed(self, fields: dict[str, Any], reservation: Reservation | None) -> None:
        """The record of a forwarded call: into its reservation (closed mode), else as room allows."""
        if reservation is None:
            await self._record_unreserved(fields)
            return
        try:
            await anyio.to_thread.run_sync(lambda: reservation.emit(**fields))
        except OSError as exc:  # the disk failed under the spool: the call ran, its record did not land
            self.counters.unaudited += 1
            log.critical("event %s of a call that ran was not recorded: %s", fields["event_id"], exc)
        finally:
            reservation.release()  # nothing if the event used it

    async def _record_unreserved(self, fields: dict[str, Any]) -> None:
        """A deny (the call is refused whatever happens here) or an open-mode call without a reservation."""
        try:
            await anyio.to_thread.run_sync(lambda: self.emitter.emit(**fields))
        except (SpoolFull, OSError, httpx.HTTPError) as exc:
            self.counters.unaudited += 1
            log.error("event %s was not recorded: %s", fields["event_id"], exc)

    async def watch_log(self, every: float = 60.0) -> None:
        """With the log's key configured: every ``every`` seconds, check that Custody's newest checkpoint verifies
        and extends the last one seen (``Emitter.check_log``); a log that forked or rewrote its history is logged
        as critical and shown in /healthz (``spool.misbehaved``), and calls go on (their events stay signed)."""
        if self.emitter.log_key is None:
            return
        while True:
            pause = every
            try:
                checkpoint = await anyio.to_thread.run_sync(self.emitter.check_log)
                log.debug("the log's checkpoint at size %d checks out", checkpoint.size)
            except LogMisbehaved as exc:
                self.emitter.delivery.misbehaved = str(exc)
                log.critical("Custody's transparency log misbehaved: %s", exc)
            except (httpx.HTTPError, OSError) as exc:
                log.warning("cannot fetch the log's checkpoint: %s", exc)
                pause = min(every, 5.0)  # Custody away: try again soon
            await anyio.sleep(pause)

    async def learn_chain_head(self) -> None:
        """At start: where the emitter's chain continues (the spool's last event, or Custody's head for a new spool),
        retried until known, so that Custody being away later does not stop the first event."""
        delay = 0.2
        while True:
            try:
                seq, _ = await anyio.to_thread.run_sync(self.emitter.chain_head)
            except (httpx.HTTPError, OSError) as exc:
                log.warning("cannot learn where the event chain continues yet: %s; retrying in %.1f s", exc, delay)
                await anyio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("events continue the chain of %s after seq %d", self.emitter.emitter_id, seq)
            return

    def _note_overhead(self, seconds: float) -> None:
        samples = self.counters.overhead_us
        samples.append(int(seconds * 1e6))
        if len(samples) > 10_000:
            del samples[:5_000]

    def health(self) -> dict[str, Any]:
        delivery = self.emitter.delivery
        return {
            "upstreams": {
                name: {"connected": upstream.error is None, "error": upstream.error, "tools": len(upstream.tools)}
                for name, upstream in self.upstreams.items()
            },
            "spool": {
                "pending": self.emitter.spool.pending,
                "bytes": self.emitter.spool.bytes_held(),
                "bytes_unacknowledged": self.emitter.spool.bytes_owed(),
                "acknowledged": delivery.acknowledged,
                "last_error": delivery.last_error,
                "blocked": delivery.blocked,
                "misbehaved": delivery.misbehaved,
                "checkpoint_seen": None if self.emitter.checkpoint is None else self.emitter.checkpoint.size,
            },
            "failure_mode": self.config.failure_mode,
            "revocations": None if self.revocations is None else self.revocations.health(),
            "policy": self.policy.label,
            "overhead_us": _percentiles(self.counters.overhead_us),
            "calls": {
                "allowed": self.counters.allowed,
                "denied": self.counters.denied,
                "refused": self.counters.refused,
                "unaudited": self.counters.unaudited,
                "upstream_errors": self.counters.upstream_errors,
            },
        }


def build_app(gateway: Gateway) -> Starlette:
    config = gateway.config
    server: Server[Any] = Server(
        "custody-gateway",
        version="1",
        instructions="Tool calls pass through Custody's gateway: checked against policy and recorded.",
        on_list_tools=gateway.list_tools,
        on_call_tool=gateway.call_tool,
        get_tool_input_schema=gateway.input_schema,
    )
    public_url = config.listen.public_url or f"http://{config.listen.host}:{config.listen.port}{config.listen.path}"

    async def health(request: Request) -> JSONResponse:
        report = gateway.health()
        ok = all(upstream["connected"] for upstream in report["upstreams"].values()) and not report["spool"]["blocked"]
        if request.client is None or request.client.host not in _LOOPBACK:
            report = {"ok": ok}  # the details (upstream errors, counters) are for the machine's own operators
        return JSONResponse(report, status_code=200 if ok else 503)

    app = server.streamable_http_app(
        streamable_http_path=config.listen.path,
        json_response=True,
        host=config.listen.host,
        auth=AuthSettings(
            issuer_url=config.auth.issuer if config.auth.issuer.startswith("http") else "https://issuer.invalid",
            resource_server_url=public_url,
            validate_token_resource=False,  # the verifier checks the audience itself
        ),
        token_verifier=gateway.verifier,
        custom_starlette_routes=[Route("/healthz", health, methods=["GET"])],
    )
    serve_sessions = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            group.start_soon(gateway.learn_chain_head)
            group.start_soon(gateway.watch_log)
            if gateway.revocations is not None:
                group.start_soon(gateway.revocations.run)
            for upstream in gateway.upstreams.values():
                group.start_soon(upstream.run)
            for upstream in gateway.upstreams.values():
                if not await upstream.ready(15.0):
                    log.error("upstream %s is not connected yet: %s", upstream.name, upstream.error)
            async with serve_sessions(app):
                yield
            group.cancel_scope.cancel()

    app.router.lifespan_context = lifespan
    return app


def _links(meta: Any) -> dict[str, str]:
    """``trace_id`` and ``parent_event_id`` for the event, from the request's ``_meta``: checked, so that no agent
    can make the gateway spool an event Custody would refuse (and so stop its delivery)."""
    links: dict[str, str] = {}
    if not meta:
        return links
    trace = meta.get(META_TRACE)
    if trace is None and isinstance(meta.get("traceparent"), str):
        match = _TRACEPARENT.match(meta["traceparent"])
        trace = match.group(1) if match else None
    if trace is not None:
        links["trace_id"] = _checked_name(trace, f"_meta {META_TRACE}")
    parent = meta.get(META_PARENT)
    if parent is not None:
        if not isinstance(parent, str) or not _UUID.match(parent):
            raise MCPError(types.INVALID_PARAMS, f"_meta {META_PARENT} must be an event id (a lowercase UUID)")
        links["parent_event_id"] = parent
    return links


def _checked_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise MCPError(types.INVALID_PARAMS, f"{what} must be a string of 1 to {MAX_NAME} characters")
    return value


def _percentiles(samples: list[int]) -> dict[str, int]:
    """p50 / p99 / max of the gateway's own time per allowed call (the upstream's excluded), recent calls."""
    if not samples:
        return {"calls": 0}
    ordered = sorted(samples)
    p50, p99 = (ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.50, 0.99))
    return {"calls": len(ordered), "p50": p50, "p99": p99, "max": ordered[-1]}


def _clipped(text: str) -> str:
    """An upstream's error text for the event: lone surrogates (which no event may hold, and which would stop the
    spool's delivery at a rejected event) replaced, and a long text cut with the count of what was left out."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if len(text) <= _ERROR_TEXT:
        return text
    return f"{text[:_ERROR_TEXT]}... ({len(text) - _ERROR_TEXT:,} more characters)"


def _result(text: str, event_id: str | None, decision: str, *, error: bool) -> types.CallToolResult:
    """A result the gateway gives itself; ``event_id`` only when an event records the call."""
    meta = {META_DECISION: decision, **({META_EVENT_ID: event_id} if event_id else {})}
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=error, _meta=meta)
