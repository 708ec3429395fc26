"""`SwitchyardEventStore`: eventsource-py's five store ports over a Switchyard proxy's
data-plane HTTP API (docs/openapi/data-plane.yaml), with one pooled async HTTP client.

See this package's README for how tenants, payloads, errors, retries and positions map.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

import httpx
from eventsource.domain import StreamId
from eventsource.domain.event import DomainEvent
from eventsource.domain.event_registry import EventRegistry, default_registry
from eventsource.domain.exceptions import (
    DuplicateEventError,
    OptimisticLockError,
)
from eventsource.domain.tenant_context import get_current_tenant
from eventsource.ports import (
    AppendResult,
    CategoryReadOptions,
    EventEnvelope,
    EventStoreConnectionError,
    ExpectedVersion,
    FeedReadOptions,
    Position,
    ReadDirection,
    StreamReadOptions,
)
from eventsource.ports.exceptions import PositionDecodeError, PositionForeignError

# The proxy's largest page (proxy/src/api.rs MAX_READ_LIMIT).
PAGE = 10_000
# Streams whose tenant the adapter remembers for reads without a tenant context.
REMEMBERED_STREAMS = 100_000


#: Statuses an intermediary in front of the proxy answers when it could not reach it.
GATEWAY_ERRORS = frozenset({502, 503, 504})


class SwitchyardError(EventStoreConnectionError):
    """A reply of the proxy that is none of eventsource-py's own errors."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.code = str(body.get("error", ""))
        self.body = dict(body)
        super().__init__(
            f"switchyard proxy answered {status} {self.code}: {body.get('message', '')}",
            store="SwitchyardEventStore",
        )


class SwitchyardEventStore:
    """eventsource-py `FullEventStore` backed by a Switchyard proxy."""

    def __init__(
        self,
        base_url: str,
        *,
        tenant_id: UUID | None = None,
        event_registry: EventRegistry | None = None,
        token: str | None = None,
        store_ids: Mapping[str, str] | None = None,
        retry_deadline_s: float = 30.0,
        timeout_s: float = 30.0,
        max_connections: int = 32,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._default_tenant = tenant_id
        self._registry = event_registry or default_registry
        self._store_ids = dict(store_ids or {})
        self._retry_deadline_s = retry_deadline_s
        self._stream_tenants: OrderedDict[StreamId, UUID] = OrderedDict()
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections),
        )

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def __aenter__(self) -> SwitchyardEventStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- tenants and positions ------------------------------------------------------------

    def _tenant(self, explicit: UUID | None = None, stream: StreamId | None = None) -> UUID:
        tenant = explicit or get_current_tenant()
        if tenant is None and stream is not None:
            tenant = self._stream_tenants.get(stream)
        tenant = tenant or self._default_tenant
        if tenant is None:
            raise ValueError(
                "no tenant: give the events a tenant_id, set eventsource-py's tenant context, "
                "or construct SwitchyardEventStore with tenant_id="
            )
        return tenant

    def _remember(self, stream: StreamId, tenant: UUID) -> None:
        self._stream_tenants[stream] = tenant
        self._stream_tenants.move_to_end(stream)
        if len(self._stream_tenants) > REMEMBERED_STREAMS:
            self._stream_tenants.popitem(last=False)

    def _position_store(self, switchyard_store: str) -> str:
        return self._store_ids.get(switchyard_store, f"switchyard:{switchyard_store}")

    def _position(self, switchyard_store: str, global_position: int) -> Position:
        return Position(store_id=self._position_store(switchyard_store), key=(global_position,))

    def _switchyard_store_of(self, position: Position) -> str | None:
        """The Switchyard store a position of this adapter belongs to (the reverse of
        `_position_store`), or None for a store id the adapter does not know."""
        for switchyard_store, position_store in self._store_ids.items():
            if position_store == position.store_id:
                return switchyard_store
        prefix = "switchyard:"
        if position.store_id and position.store_id.startswith(prefix):
            return position.store_id[len(prefix) :]
        return None

    @staticmethod
    def _position_value(position: Position) -> int:
        if len(position.key) != 1 or not isinstance(position.key[0], int):
            raise PositionDecodeError(f"not a Switchyard position: {position!r}")
        return position.key[0]

    # -- HTTP -----------------------------------------------------------------------------

    async def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One call, retried while the proxy says a retry can help or the connection failed
        (appends carry their event ids, so a retry is answered idempotently)."""
        deadline = time.monotonic() + self._retry_deadline_s
        delay = 0.05
        while True:
            try:
                response = await self._client.request(method, path, **kwargs)
            except httpx.TransportError as e:
                if time.monotonic() + delay > deadline:
                    raise EventStoreConnectionError(
                        f"switchyard proxy unreachable: {e}", store="SwitchyardEventStore"
                    ) from e
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            try:
                body: dict[str, Any] = response.json() if response.content else {}
            except ValueError:
                # Not the proxy's JSON: an intermediary (a load balancer, an ingress) answered.
                body = {"error": "unexpected_reply", "message": response.text[:500]}
                if response.status_code in GATEWAY_ERRORS and time.monotonic() + delay <= deadline:
                    # As a lost connection: the request may not have reached the proxy, and
                    # sending it again is safe (an append carries its event ids).
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 1.0)
                    continue
                raise SwitchyardError(response.status_code, body) from None
            if response.is_success:
                return body
            if body.get("retryable") and body.get("may_have_committed") is not True:
                retry_after = response.headers.get("retry-after")
                wait = min(float(retry_after), 1.0) if retry_after else delay
                if time.monotonic() + wait <= deadline:
                    await asyncio.sleep(wait)
                    delay = min(delay * 2, 1.0)
                    continue
            raise SwitchyardError(response.status_code, body)

    async def _pages(
        self,
        path: str,
        params: dict[str, Any],
        limit: int | None,
        advance: Any,
        check: Any = None,
    ) -> AsyncIterator[EventEnvelope]:
        """The events of a paged read, page after page until `limit` or the reply's `next`
        is null; `advance(params, next)` gives the next page's parameters."""
        remaining = limit
        while remaining is None or remaining > 0:
            page = PAGE if remaining is None else min(remaining, PAGE)
            reply = await self._request("GET", path, params={**params, "limit": page})
            if check is not None:
                check(reply)
            for raw in reply["events"]:
                yield self._envelope(raw)
            if remaining is not None:
                remaining -= len(reply["events"])
            if reply.get("next") is None:
                return
            params = advance(params, reply["next"])

    # -- EventAppender --------------------------------------------------------------------

    async def append(
        self, stream: StreamId, events: Sequence[DomainEvent], expected: ExpectedVersion
    ) -> AppendResult:
        if not events:
            raise ValueError("cannot append an empty batch of events")
        tenants = {e.tenant_id for e in events if e.tenant_id is not None}
        if len(tenants) > 1:
            raise ValueError(f"one append holds events of {len(tenants)} tenants; a stream has one")
        tenant = self._tenant(next(iter(tenants), None))
        for event in events:
            # Refused before it is stored, so nothing unreadable lands.
            self._registry.get(event.event_type)
        if expected.kind == "exact":
            expected_version: int | str = expected.version or 0
        else:
            expected_version = expected.kind
        body = {
            "expected_version": expected_version,
            "events": [
                {
                    "event_id": str(e.event_id),
                    "event_type": e.event_type,
                    "payload": e.model_dump(mode="json"),
                    "actor_id": e.actor_id,
                    "timestamp": e.occurred_at.isoformat(),
                }
                for e in events
            ],
        }
        try:
            reply = await self._request("POST", self._stream_path(tenant, stream, "events"), json=body)
        except SwitchyardError as e:
            if e.code == "version_conflict":
                expected_desc: int | str = (
                    expected.version or 0 if expected.kind == "exact" else expected.kind
                )
                raise OptimisticLockError(
                    stream.aggregate_id, expected_desc, int(e.body.get("actual_version") or 0)
                ) from e
            if e.code in ("event_id_conflict", "duplicate_event_id", "retry_order_mismatch"):
                raise DuplicateEventError(str(e)) from e
            raise
        self._remember(stream, tenant)
        return AppendResult(
            stream=stream,
            new_version=reply["last_version"],
            position=self._position(reply["store_id"], reply["global_positions"][0]),
        )

    # -- StreamReader ---------------------------------------------------------------------

    def read_stream(
        self, stream: StreamId, options: StreamReadOptions | None = None
    ) -> AsyncIterator[EventEnvelope]:
        return self._read_stream(stream, options or StreamReadOptions())

    async def _read_stream(
        self, stream: StreamId, options: StreamReadOptions
    ) -> AsyncIterator[EventEnvelope]:
        tenant = self._tenant(stream=stream)
        backward = options.direction == ReadDirection.BACKWARD
        params: dict[str, Any] = {"from_version": options.from_version or 1}
        if options.to_version is not None:
            params["to_version"] = options.to_version
        if backward:
            params["direction"] = "backward"
        # The next page starts below the last version read (backward) or above it.
        key = "to_version" if backward else "from_version"
        async for envelope in self._pages(
            self._stream_path(tenant, stream, "events"),
            params,
            options.limit,
            lambda p, nxt: {**p, key: nxt},
        ):
            yield envelope

    async def get_stream_version(self, stream: StreamId) -> int:
        tenant = self._tenant(stream=stream)
        reply = await self._request("GET", self._stream_path(tenant, stream, "version"))
        return int(reply["version"])

    # -- EventLookup ----------------------------------------------------------------------

    async def event_exists(self, event_id: UUID) -> bool:
        tenant = self._tenant()
        reply = await self._request("GET", f"/v1/tenants/{tenant}/events/{event_id}")
        return reply.get("event") is not None

    # -- GlobalEventFeed ------------------------------------------------------------------

    def read_all(
        self, from_position: Position | None = None, options: FeedReadOptions | None = None
    ) -> AsyncIterator[EventEnvelope]:
        return self._read_all(from_position, options or FeedReadOptions())

    async def _read_all(
        self, from_position: Position | None, options: FeedReadOptions
    ) -> AsyncIterator[EventEnvelope]:
        """The tenant feed from `from_position`. The position is sent with the Switchyard store
        it belongs to (`after_store`), so after the tenant was migrated the proxy translates it
        to the store the tenant now reads from (every event not yet seen is delivered; some
        near the position may come again). A position of a store the adapter cannot name is
        sent alone, and a reply from another store raises `PositionForeignError`, as does a
        position the proxy cannot translate (`cursor_not_translatable`)."""
        tenant = self._tenant(options.tenant_id)
        params: dict[str, Any] = {
            "after_position": 0 if from_position is None else self._position_value(from_position)
        }
        cursor_store = None if from_position is None else self._switchyard_store_of(from_position)
        if cursor_store is not None:
            params["after_store"] = cursor_store
        if options.aggregate_type is not None:
            params["aggregate_type"] = options.aggregate_type
        # The store the next page's cursor (the reply's `next`) belongs to.
        replied: dict[str, str] = {}

        def same_store(reply: Mapping[str, Any]) -> None:
            first_page = not replied
            replied["store"] = reply["store_id"]
            store = self._position_store(reply["store_id"])
            if (
                first_page
                and from_position is not None
                and cursor_store is None
                and store != from_position.store_id
            ):
                raise PositionForeignError(
                    f"position belongs to {from_position.store_id!r}, a store this adapter "
                    f"cannot name to the proxy; tenant {tenant} reads from {store!r} (give "
                    "SwitchyardEventStore store_ids= for it, or translate the checkpoint: "
                    "switchyard-control checkpoints migrate)"
                )

        try:
            async for envelope in self._pages(
                f"/v1/tenants/{tenant}/events",
                params,
                options.limit,
                lambda p, nxt: {**p, "after_position": nxt, "after_store": replied["store"]},
                same_store,
            ):
                yield envelope
        except SwitchyardError as e:
            if e.code == "cursor_not_translatable":
                raise PositionForeignError(
                    f"position {from_position!r} cannot be translated to the store tenant "
                    f"{tenant} now reads from: {e.body.get('message', '')}"
                ) from e
            raise

    async def current_position(self) -> Position | None:
        tenant = self._tenant()
        reply = await self._request("GET", f"/v1/tenants/{tenant}/position")
        if reply.get("position") is None:
            return None
        return self._position(reply["store_id"], reply["position"])

    # -- CategoryQuery --------------------------------------------------------------------

    def read_category(
        self, category: str, options: CategoryReadOptions | None = None
    ) -> AsyncIterator[EventEnvelope]:
        return self._read_category(category, options or CategoryReadOptions())

    async def _read_category(
        self, category: str, options: CategoryReadOptions
    ) -> AsyncIterator[EventEnvelope]:
        tenant = self._tenant(options.tenant_id)
        params: dict[str, Any] = {}
        if options.from_timestamp is not None:
            ts = options.from_timestamp
            # A naive datetime is taken as UTC (the library stores UTC).
            params["from_timestamp"] = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
        async for envelope in self._pages(
            f"/v1/tenants/{tenant}/categories/{quote(category, safe='')}/events",
            params,
            options.limit,
            lambda _, nxt: dict(nxt),
        ):
            yield envelope

    # -- decoding -------------------------------------------------------------------------

    @staticmethod
    def _stream_path(tenant: UUID, stream: StreamId, last: str) -> str:
        return (
            f"/v1/tenants/{tenant}/streams/{quote(stream.category, safe='')}/"
            f"{stream.aggregate_id}/{last}"
        )

    def _envelope(self, raw: Mapping[str, Any]) -> EventEnvelope:
        event_class = self._registry.get(raw["event_type"])
        event = event_class.model_validate(raw["payload"])
        stream = StreamId(aggregate_id=UUID(raw["aggregate_id"]), category=raw["aggregate_type"])
        if raw.get("tenant_id"):
            self._remember(stream, UUID(raw["tenant_id"]))
        return EventEnvelope(
            event,
            stream,
            raw["version"],
            self._position(raw["store_id"], raw["global_position"]),
            datetime.fromisoformat(raw["stored_at"]),
        )


__all__ = ["SwitchyardError", "SwitchyardEventStore"]
