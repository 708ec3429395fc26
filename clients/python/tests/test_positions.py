"""Feed positions carry their Switchyard store: `read_all` sends it (`after_store`) so the proxy
can translate a position of a store the tenant was migrated from, follows the store of each
reply for the next page, and raises `PositionForeignError` only for what cannot be translated."""

from urllib.parse import parse_qs, urlsplit
from uuid import uuid4

import httpx
import pytest
from eventsource.ports import ExpectedVersion, FeedReadOptions, Position, collect
from eventsource.ports.exceptions import PositionForeignError
from eventsource.testing.conformance_ports._fixtures import (
    make_conformance_registry,
    make_event,
    make_stream,
)

from switchyard_eventsource import SwitchyardEventStore


async def test_read_all_sends_the_positions_store_and_follows_each_replys_store() -> None:
    replies = [
        # The tenant moved: the proxy translated the cursor and answers from the target.
        httpx.Response(200, json={"store_id": "dedicated", "events": [], "next": 9}),
        httpx.Response(200, json={"store_id": "dedicated", "events": [], "next": None}),
    ]
    seen: list[dict] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append({k: v[0] for k, v in parse_qs(urlsplit(str(request.url)).query).items()})
        return replies.pop(0)

    client = httpx.AsyncClient(base_url="http://proxy", transport=httpx.MockTransport(handle))
    store = SwitchyardEventStore(
        "http://proxy", tenant_id=uuid4(), event_registry=make_conformance_registry(), client=client
    )
    await collect(store.read_all(Position(store_id="switchyard:shared", key=(41,))))
    assert seen[0]["after_position"] == "41" and seen[0]["after_store"] == "shared"
    assert seen[1]["after_position"] == "9" and seen[1]["after_store"] == "dedicated"


async def test_a_position_of_a_store_the_tenant_never_left_raises_position_foreign(
    adapter: SwitchyardEventStore,
) -> None:
    with pytest.raises(PositionForeignError, match="cannot be translated"):
        await collect(adapter.read_all(Position(store_id="switchyard:elsewhere", key=(3,))))


async def test_a_position_of_a_store_the_adapter_cannot_name_raises_position_foreign(
    adapter: SwitchyardEventStore,
) -> None:
    with pytest.raises(PositionForeignError, match="cannot name"):
        await collect(
            adapter.read_all(
                Position(store_id="pg:another", key=(3,)),
                FeedReadOptions(),
            )
        )


async def test_a_position_persisted_as_text_continues_the_feed_after_its_event(
    adapter: SwitchyardEventStore,
) -> None:
    stream = make_stream()
    events = [make_event(stream.aggregate_id) for _ in range(4)]
    await adapter.append(stream, events, ExpectedVersion.no_stream())
    feed = await collect(adapter.read_all())
    checkpoint = feed[1].position
    assert checkpoint is not None and checkpoint.store_id.startswith("switchyard:")
    restored = Position.from_str(checkpoint.to_str())
    assert restored == checkpoint
    rest = await collect(adapter.read_all(restored))
    assert [e.event.event_id for e in rest] == [e.event_id for e in events[2:]]
