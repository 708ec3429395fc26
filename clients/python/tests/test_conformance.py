"""eventsource-py 0.15.1's own conformance suites for the five store ports, run against
`SwitchyardEventStore` on a real proxy."""

import asyncio
from datetime import timedelta
from uuid import uuid4

import pytest
from eventsource.ports import CategoryReadOptions, ExpectedVersion, collect
from eventsource.testing import (
    AppenderConformance,
    CategoryQueryConformance,
    EventLookupConformance,
    GlobalFeedConformance,
    StreamReaderConformance,
)

from eventsource.testing.conformance_ports._fixtures import ConformanceEvent, make_stream

from switchyard_eventsource import SwitchyardError, SwitchyardEventStore


class TestAppender(AppenderConformance):
    @pytest.fixture
    def store(self, adapter: SwitchyardEventStore) -> SwitchyardEventStore:
        return adapter


class TestStreamReader(StreamReaderConformance):
    @pytest.fixture
    def store(self, adapter: SwitchyardEventStore) -> SwitchyardEventStore:
        return adapter


class TestEventLookup(EventLookupConformance):
    @pytest.fixture
    def store(self, adapter: SwitchyardEventStore) -> SwitchyardEventStore:
        return adapter


class TestGlobalFeed(GlobalFeedConformance):
    @pytest.fixture
    def store(self, adapter: SwitchyardEventStore) -> SwitchyardEventStore:
        return adapter


class TestCategoryQuery(CategoryQueryConformance):
    """Two of the library's cases append events of two tenants to ONE stream. In Switchyard a
    stream belongs to one tenant (the unit it routes and migrates), so the second tenant's
    append is refused; those two cases are replaced by the same checks with a stream per
    tenant, plus the refusal itself."""

    @pytest.fixture
    def store(self, adapter: SwitchyardEventStore) -> SwitchyardEventStore:
        return adapter

    async def test_tenant_filter_honored(self, store: SwitchyardEventStore) -> None:
        tenant_a, tenant_b = uuid4(), uuid4()
        stream_a, stream_b = make_stream(category="Tenanted"), make_stream(category="Tenanted")
        ev_a = ConformanceEvent(aggregate_id=stream_a.aggregate_id, tenant_id=tenant_a, payload="1")
        ev_b = ConformanceEvent(aggregate_id=stream_b.aggregate_id, tenant_id=tenant_b, payload="2")
        await store.append(stream_a, [ev_a], ExpectedVersion.any_())
        await store.append(stream_b, [ev_b], ExpectedVersion.any_())
        envelopes = await collect(store.read_category("Tenanted", CategoryReadOptions(tenant_id=tenant_a)))
        assert [e.event.payload for e in envelopes] == ["1"]  # type: ignore[attr-defined]

    async def test_limit_from_timestamp_and_tenant_combined(self, store: SwitchyardEventStore) -> None:
        tenant_a, tenant_b = uuid4(), uuid4()
        stream, other = make_stream(category="Combo"), make_stream(category="Combo")
        ev_0 = ConformanceEvent(aggregate_id=stream.aggregate_id, tenant_id=tenant_a, payload="0")
        await store.append(stream, [ev_0], ExpectedVersion.any_())
        early = await collect(store.read_category("Combo", CategoryReadOptions(tenant_id=tenant_a)))
        cutoff = early[0].stored_at
        await asyncio.sleep(0.01)
        for i in range(1, 5):
            ev = ConformanceEvent(aggregate_id=stream.aggregate_id, tenant_id=tenant_a, payload=str(i))
            await store.append(stream, [ev], ExpectedVersion.any_())
        ev_x = ConformanceEvent(aggregate_id=other.aggregate_id, tenant_id=tenant_b, payload="x")
        await store.append(other, [ev_x], ExpectedVersion.any_())
        opts = CategoryReadOptions(from_timestamp=cutoff + timedelta(milliseconds=1), tenant_id=tenant_a, limit=2)
        envelopes = await collect(store.read_category("Combo", opts))
        assert [e.event.payload for e in envelopes] == ["1", "2"]  # type: ignore[attr-defined]

    async def test_another_tenants_event_on_a_stream_is_refused(
        self, store: SwitchyardEventStore
    ) -> None:
        stream = make_stream(category="Tenanted")
        first = ConformanceEvent(aggregate_id=stream.aggregate_id, tenant_id=uuid4())
        await store.append(stream, [first], ExpectedVersion.any_())
        with pytest.raises(SwitchyardError) as refused:
            intruder = ConformanceEvent(aggregate_id=stream.aggregate_id, tenant_id=uuid4())
            await store.append(stream, [intruder], ExpectedVersion.any_())
        assert refused.value.code == "stream_not_found"
        assert [e.event.event_id for e in await collect(store.read_stream(stream))] == [first.event_id]
