"""An application on the adapter that keeps appending to and reading its streams while the Rust
test (e2e/python_client.rs) migrates its tenant to another store and cuts it over: no error
reaches it, and every append it was told succeeded is there afterwards, in order. Beside it
a projection tails the tenant feed from its own checkpoint (an eventsource-py `Position`) all
along: its checkpoint, a position of the source, carries it through the cutover, and it ends
having seen every acknowledged event.

Driven by the Rust test: `SWITCHYARD_TENANT`, and two files, `SWITCHYARD_READY_FILE` (this
test writes it once it is appending) and `SWITCHYARD_STOP_FILE` (the Rust test writes it when
the cutover is done and more appends landed in the target)."""

import asyncio
import os
from pathlib import Path
from uuid import UUID

from eventsource.domain.tenant_context import tenant_scope
from eventsource.ports import ExpectedVersion, FeedReadOptions, Position, collect
from eventsource.testing.conformance_ports._fixtures import (
    ConformanceEvent,
    make_conformance_registry,
    make_stream,
)

from conftest import env
from switchyard_eventsource import SwitchyardEventStore


class Projection:
    """A projection as eventsource-py runs one: reads the feed from its checkpoint, handles
    each event (records its id), checkpoints the event's position — persisted as text
    (`Position.to_str`), as a checkpoint store keeps it, and read back before each catch-up."""

    def __init__(self, store: SwitchyardEventStore, tenant: UUID) -> None:
        self.store, self.tenant = store, tenant
        self.checkpoint: str | None = None
        self.seen: list[UUID] = []
        self.checkpoint_stores: list[str] = []
        self.stopping = False

    async def catch_up(self) -> None:
        options = FeedReadOptions(tenant_id=self.tenant)
        start = None if self.checkpoint is None else Position.from_str(self.checkpoint)
        async for envelope in self.store.read_all(start, options):
            self.seen.append(envelope.event.event_id)
            assert envelope.position is not None
            self.checkpoint = envelope.position.to_str()
            if self.checkpoint_stores[-1:] != [envelope.position.store_id]:
                self.checkpoint_stores.append(envelope.position.store_id)

    async def run(self) -> None:
        while not self.stopping:
            await self.catch_up()
            await asyncio.sleep(0.01)


async def test_appends_and_reads_continue_through_a_migration_and_cutover() -> None:
    tenant = UUID(env("SWITCHYARD_TENANT"))
    ready, stop = Path(env("SWITCHYARD_READY_FILE")), Path(env("SWITCHYARD_STOP_FILE"))
    store = SwitchyardEventStore(
        env("SWITCHYARD_URL"), tenant_id=tenant, event_registry=make_conformance_registry()
    )
    streams = [make_stream(category="Order") for _ in range(4)]
    acked: dict = {s: [] for s in streams}
    stores_seen: set[str] = set()
    appends = 0
    projection = Projection(store, tenant)
    projecting = asyncio.create_task(projection.run())
    async with tenant_scope(tenant):
        while not stop.exists():
            stream = streams[appends % len(streams)]
            # What a repository does: read the version, append at exactly it.
            version = await store.get_stream_version(stream)
            assert version == len(acked[stream])
            event = ConformanceEvent(aggregate_id=stream.aggregate_id, tenant_id=tenant)
            result = await store.append(stream, [event], ExpectedVersion.exact(version))
            assert result.new_version == version + 1
            assert result.position is not None
            stores_seen.add(result.position.store_id)
            acked[stream].append(event.event_id)
            read = await collect(store.read_stream(stream))
            assert [e.event.event_id for e in read] == acked[stream]
            appends += 1
            if appends == 20:
                ready.write_text("appending")
            await asyncio.sleep(0.005)
        projection.stopping = True
        await projecting
        await projection.catch_up()
        everything = {i for ids in acked.values() for i in ids}
        missing = everything - set(projection.seen)
        assert not missing, f"the projection never saw {len(missing)} acknowledged events"
        # Its checkpoint moved from the source's positions to the target's, never reset.
        assert projection.checkpoint_stores == ["switchyard:shared", "switchyard:dedicated"], (
            projection.checkpoint_stores
        )
        for stream in streams:
            read = await collect(store.read_stream(stream))
            assert [e.event.event_id for e in read] == acked[stream]
        feed = await collect(store.read_all(options=FeedReadOptions(tenant_id=tenant)))
        assert sorted(e.event.event_id for e in feed) == sorted(i for ids in acked.values() for i in ids)
        # Every read now comes from the target: the feed, the category, the position, lookups.
        assert {e.position.store_id for e in feed if e.position} == {"switchyard:dedicated"}
        category = await collect(store.read_category("Order"))
        assert len(category) == len(feed)
        assert {e.position.store_id for e in category if e.position} == {"switchyard:dedicated"}
        position = await store.current_position()
        assert position is not None and position.store_id == "switchyard:dedicated"
        assert await store.event_exists(feed[0].event.event_id)
    await store.close()
    # The appends were answered by both stores: the migration happened under this loop.
    assert stores_seen == {"switchyard:shared", "switchyard:dedicated"}, stores_seen
    print(
        f"{appends} appends, answered by {sorted(stores_seen)}; the projection saw "
        f"{len(projection.seen)} events ({len(projection.seen) - len(set(projection.seen))} twice)"
    )
