"""A retryable refusal (503 with Retry-After, e.g. writes paused for a cutover) is retried with
the same event ids, which the proxy answers idempotently; a conflict is not retried."""

import json
from uuid import uuid4

import httpx
import pytest
from eventsource.domain.exceptions import OptimisticLockError
from eventsource.ports import ExpectedVersion
from eventsource.testing.conformance_ports._fixtures import (
    make_conformance_registry,
    make_event,
    make_stream,
)

from switchyard_eventsource import SwitchyardEventStore
from switchyard_eventsource.store import SwitchyardError


def adapter_answering(replies: list[httpx.Response], seen: list[dict]) -> SwitchyardEventStore:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return replies.pop(0)

    client = httpx.AsyncClient(base_url="http://proxy", transport=httpx.MockTransport(handle))
    return SwitchyardEventStore(
        "http://proxy", tenant_id=uuid4(), event_registry=make_conformance_registry(), client=client
    )


async def test_a_paused_append_is_retried_with_the_same_event_ids() -> None:
    paused = httpx.Response(
        503,
        headers={"retry-after": "0"},
        json={"error": "writes_paused", "message": "paused", "retryable": True},
    )
    done = httpx.Response(
        201,
        json={"store_id": "dedicated", "first_version": 1, "last_version": 2,
              "global_positions": [7, 8]},
    )
    seen: list[dict] = []
    store = adapter_answering([paused, paused, done], seen)
    stream = make_stream()
    events = [make_event(stream.aggregate_id), make_event(stream.aggregate_id)]

    result = await store.append(stream, events, ExpectedVersion.no_stream())

    assert result.new_version == 2 and result.position is not None
    assert result.position.store_id == "switchyard:dedicated" and result.position.key == (7,)
    assert len(seen) == 3
    ids = [[e["event_id"] for e in body["events"]] for body in seen]
    assert ids[0] == ids[1] == ids[2] == [str(e.event_id) for e in events]


async def test_a_conflict_is_not_retried() -> None:
    conflict = httpx.Response(
        409,
        json={"error": "version_conflict", "message": "conflict", "retryable": False,
              "expected_version": 0, "actual_version": 3},
    )
    seen: list[dict] = []
    store = adapter_answering([conflict], seen)
    stream = make_stream()
    with pytest.raises(OptimisticLockError) as raised:
        await store.append(stream, [make_event(stream.aggregate_id)], ExpectedVersion.no_stream())
    assert raised.value.actual_version == 3
    assert len(seen) == 1


async def test_a_gateway_error_that_is_not_the_proxys_is_retried_then_named() -> None:
    # What a load balancer in front of the proxy answers: HTML, not the proxy's JSON error.
    gateway = httpx.Response(502, text="<html><body>502 Bad Gateway</body></html>")
    done = httpx.Response(
        201,
        json={"store_id": "shared", "first_version": 1, "last_version": 1,
              "global_positions": [3]},
    )
    seen: list[dict] = []
    store = adapter_answering([gateway, done], seen)
    stream = make_stream()
    events = [make_event(stream.aggregate_id)]

    result = await store.append(stream, events, ExpectedVersion.no_stream())

    assert result.new_version == 1
    assert len(seen) == 2 and seen[0]["events"] == seen[1]["events"]


async def test_a_reply_that_is_not_json_is_a_clear_error() -> None:
    teapot = httpx.Response(418, text="I'm a teapot")
    seen: list[dict] = []
    store = adapter_answering([teapot], seen)
    stream = make_stream()
    with pytest.raises(SwitchyardError) as raised:
        await store.append(stream, [make_event(stream.aggregate_id)], ExpectedVersion.no_stream())
    assert raised.value.status == 418
    assert raised.value.code == "unexpected_reply"
    assert "I'm a teapot" in str(raised.value)
    assert len(seen) == 1
