"""Fixtures: a `SwitchyardEventStore` on the proxy the Rust test harness started
(`SWITCHYARD_URL`), with a fresh default tenant per test so every test sees an empty store.

Run through `cargo nextest run -p switchyard-tests -E 'test(/^python_client::/)'`, which starts the
real proxy on PostgreSQL and on SQLite and sets the variables; without them the tests fail.
"""

import os
from collections.abc import AsyncIterator
from uuid import uuid4

import pytest
from eventsource.testing.conformance_ports._fixtures import make_conformance_registry

from switchyard_eventsource import SwitchyardEventStore


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run these tests through the Rust test python_client")
    return value


@pytest.fixture
def proxy_url() -> str:
    return env("SWITCHYARD_URL")


@pytest.fixture
async def adapter(proxy_url: str) -> AsyncIterator[SwitchyardEventStore]:
    store = SwitchyardEventStore(
        proxy_url, tenant_id=uuid4(), event_registry=make_conformance_registry()
    )
    yield store
    await store.close()
