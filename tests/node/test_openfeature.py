"""relay.openfeature: the OpenFeature provider over relay.client, against a live node."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openfeature import api
from openfeature.event import EventDetails, ProviderEvent
from openfeature.exception import ErrorCode

from relay.client import RelayClient
from relay.node import Node
from relay.openfeature import RelayProvider
from tests.helpers import Admin, wait_until


@pytest.fixture(autouse=True)
def _fresh_openfeature() -> Iterator[None]:
    yield
    api.clear_providers()
    api.clear_hooks()


async def test_flags_by_type_and_the_changes_as_events(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["sdk-of"])
    await admin.publish("prod", {"checkout": True, "banner": "hi", "limit": 3, "ratio": 0.5,
                                 "theme": {"dark": True}, "tags": ["a"]})
    client = RelayClient(node.ws_url, "sdk-of")
    provider = RelayProvider(client)
    await provider.start()
    changes: list[EventDetails] = []
    api.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, changes.append)
    api.set_provider(provider)
    of = api.get_client()
    try:
        assert of.get_boolean_value("checkout", False) is True
        assert of.get_string_value("banner", "") == "hi"
        assert of.get_integer_value("limit", 0) == 3
        assert of.get_float_value("ratio", 0.0) == 0.5
        assert of.get_float_value("limit", 0.0) == 3
        assert of.get_object_value("theme", {}) == {"dark": True}
        assert of.get_object_value("tags", {}) == ["a"]
        details = of.get_boolean_details("checkout", False)
        assert details.flag_metadata == {"version": client.version}
        for wrong in (of.get_boolean_details("limit", False), of.get_integer_details("checkout", 7),
                      of.get_string_details("theme", "d")):
            assert wrong.error_code == ErrorCode.TYPE_MISMATCH, wrong
            assert wrong.value in (False, 7, "d")
        missing = of.get_string_details("nope", "dflt")
        assert (missing.value, missing.error_code) == ("dflt", ErrorCode.FLAG_NOT_FOUND)

        v = await admin.publish("prod", {"banner": "bye"}, dels=["tags"])
        await client.wait_for_version(v, timeout=10)
        await wait_until(lambda: len(changes) >= 1, "a configuration-changed event")
        assert changes[-1].flags_changed == ["banner", "tags"]
        assert of.get_string_value("banner", "") == "bye"
        assert of.get_object_value("tags", {"gone": 1}) == {"gone": 1}
    finally:
        await client.close()


async def test_stale_while_disconnected_ready_again_error_when_refused(node: Node) -> None:
    admin = Admin(node.admin_url)
    await admin.put_env("prod", ["sdk-of"])
    await admin.publish("prod", {"a": 1})
    client = RelayClient(node.ws_url, "sdk-of", backoff_base=0.05, backoff_max=0.2)
    provider = RelayProvider(client)
    await provider.start()
    events: list[ProviderEvent] = []
    for kind in (ProviderEvent.PROVIDER_STALE, ProviderEvent.PROVIDER_READY,
                 ProviderEvent.PROVIDER_ERROR):
        api.add_handler(kind, lambda d, kind=kind: events.append(kind))
    api.set_provider(provider)
    try:
        await wait_until(lambda: ProviderEvent.PROVIDER_READY in events, "ready")
        events.clear()
        # The connection breaks (no close frame: as a network failure looks to the client).
        for conn in list(node.sdk.connections):
            assert conn.transport is not None
            conn.transport.abort()
        await wait_until(lambda: events[:2] == [ProviderEvent.PROVIDER_STALE,
                                                ProviderEvent.PROVIDER_READY], "stale, ready")
        assert api.get_client().get_integer_value("a", 0) == 1
        await admin.put_env("prod", ["another"])  # revokes sdk-of: 4001
        await wait_until(lambda: ProviderEvent.PROVIDER_ERROR in events, "error")
        assert client.status == "closed"
    finally:
        await client.close()
        await admin.close()
