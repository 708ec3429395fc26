"""An application can switch between eventsource-py's own `PostgreSQLEventStore` and
`SwitchyardEventStore` on the same data, both ways: each reads what the other wrote, appends
continue each other's streams, and the stored payload is the same bytes-for-meaning.

Needs the PostgreSQL store behind the proxy (`SWITCHYARD_STORE_URL`, set by the Rust test on
its PostgreSQL run)."""

import asyncio
import json
from collections.abc import AsyncIterator
from uuid import uuid4

import asyncpg
import pytest
from eventsource.adapters.postgresql import PostgreSQLEventStore
from eventsource.domain.tenant_context import tenant_scope
from eventsource.ports import ExpectedVersion, FeedReadOptions, collect
from eventsource.testing.conformance_ports._fixtures import (
    ConformanceEvent,
    make_conformance_registry,
    make_stream,
)
from sqlalchemy.ext.asyncio import create_async_engine

from conftest import env
from switchyard_eventsource import SwitchyardEventStore


@pytest.fixture
async def library_store() -> AsyncIterator[PostgreSQLEventStore]:
    url = env("SWITCHYARD_STORE_URL").replace("postgres://", "postgresql+asyncpg://", 1)
    store = PostgreSQLEventStore(
        create_async_engine(url), make_conformance_registry(), owns_engine=True
    )
    yield store
    await store.close()


def events(aggregate_id, tenant, n, tag):  # type: ignore[no-untyped-def]
    return [
        ConformanceEvent(aggregate_id=aggregate_id, tenant_id=tenant, payload=f"{tag}{i}")
        for i in range(n)
    ]


async def test_the_library_store_reads_and_extends_what_the_adapter_wrote(
    adapter: SwitchyardEventStore, library_store: PostgreSQLEventStore
) -> None:
    tenant = uuid4()
    stream = make_stream(category="Order")
    written = events(stream.aggregate_id, tenant, 3, "adapter")
    await adapter.append(stream, written, ExpectedVersion.no_stream())

    read = await collect(library_store.read_stream(stream))
    assert [e.event for e in read] == written
    assert [e.stream_version for e in read] == [1, 2, 3]
    assert await library_store.get_stream_version(stream) == 3
    # The library's feed shows rows below its stable horizon (no older transaction still
    # open anywhere on the server), so it may take a moment.
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        feed = await collect(library_store.read_all(options=FeedReadOptions(tenant_id=tenant)))
        if feed or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert [e.event.event_id for e in feed] == [e.event_id for e in written]

    more = events(stream.aggregate_id, tenant, 2, "library")
    await library_store.append(stream, more, ExpectedVersion.exact(3))
    async with tenant_scope(tenant):
        back = await collect(adapter.read_stream(stream))
    assert [e.event for e in back] == written + more


async def test_the_adapter_reads_and_extends_what_the_library_store_wrote(
    adapter: SwitchyardEventStore, library_store: PostgreSQLEventStore
) -> None:
    tenant = uuid4()
    stream = make_stream(category="Order")
    written = events(stream.aggregate_id, tenant, 2, "library")
    await library_store.append(stream, written, ExpectedVersion.no_stream())

    async with tenant_scope(tenant):
        assert await adapter.get_stream_version(stream) == 2
        read = await collect(adapter.read_stream(stream))
        assert [await adapter.event_exists(e.event_id) for e in written] == [True, True]
        assert [e.event for e in read] == written
        await adapter.append(
            stream, events(stream.aggregate_id, tenant, 1, "adapter"), ExpectedVersion.exact(2)
        )
    feed = await collect(adapter.read_all(options=FeedReadOptions(tenant_id=tenant)))
    assert [e.stream_version for e in feed] == [1, 2, 3]
    assert await library_store.get_stream_version(stream) == 3


async def test_both_stores_write_the_same_row_for_the_same_event(
    adapter: SwitchyardEventStore, library_store: PostgreSQLEventStore
) -> None:
    tenant = uuid4()
    by_adapter, by_library = make_stream(category="Order"), make_stream(category="Order")
    [a] = events(by_adapter.aggregate_id, tenant, 1, "same")
    [b] = events(by_library.aggregate_id, tenant, 1, "same")
    await adapter.append(by_adapter, [a], ExpectedVersion.no_stream())
    await library_store.append(by_library, [b], ExpectedVersion.no_stream())

    conn = await asyncpg.connect(env("SWITCHYARD_STORE_URL"))
    try:
        rows = {
            r["event_id"]: r
            for r in await conn.fetch(
                "SELECT event_id, event_type, tenant_id, actor_id, timestamp, payload::jsonb AS p"
                " FROM events WHERE event_id = ANY($1::uuid[])",
                [a.event_id, b.event_id],
            )
        }
    finally:
        await conn.close()
    ra, rb = rows[a.event_id], rows[b.event_id]
    for key in ("event_type", "tenant_id", "actor_id"):
        assert ra[key] == rb[key]
    assert ra["timestamp"] == a.occurred_at and rb["timestamp"] == b.occurred_at

    pa, pb = json.loads(ra["p"]), json.loads(rb["p"])
    assert pa == a.model_dump(mode="json") and pb == b.model_dump(mode="json")
    # The same shape: only the ids and times that differ between the two events differ.
    assert set(pa) == set(pb)
