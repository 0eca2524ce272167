"""relay.openfeature: the OpenFeature provider over relay.client, against a live node."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from openfeature import api
from openfeature.event import EventDetails, ProviderEvent
from openfeature.exception import ErrorCode
from openfeature.provider import ProviderStatus

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
    statuses: list[str] = []
    client = RelayClient(node.ws_url, "sdk-of", backoff_base=0.05, backoff_max=0.2,
                         on_status=statuses.append)
    provider = RelayProvider(client)
    await provider.start()
    # The SDK runs handlers on its own threads, in no set order, and tells a handler added
    # for an event its provider is already in at once: keep relay's events, as a set.
    events: set[ProviderEvent] = set()
    for kind in (ProviderEvent.PROVIDER_STALE, ProviderEvent.PROVIDER_READY,
                 ProviderEvent.PROVIDER_ERROR):
        api.add_handler(kind, lambda d, kind=kind: d.provider_name == "relay" and events.add(kind))
    api.set_provider(provider)
    try:
        await wait_until(lambda: ProviderEvent.PROVIDER_READY in events, "ready")
        await asyncio.sleep(0.2)  # (a late duplicate of the first READY would land here)
        events.clear()
        # The connection breaks (no close frame: as a network failure looks to the client).
        for conn in list(node.sdk.connections):
            assert conn.transport is not None
            conn.transport.abort()
        await wait_until(lambda: {ProviderEvent.PROVIDER_STALE,
                                  ProviderEvent.PROVIDER_READY} <= events, "stale, then ready")
        assert statuses[-2:] == ["reconnecting", "ready"], statuses
        assert api.get_client().get_integer_value("a", 0) == 1
        await admin.put_env("prod", ["another"])  # revokes sdk-of: 4001
        await wait_until(lambda: ProviderEvent.PROVIDER_ERROR in events, "error")
        assert client.status == "closed"
    finally:
        await client.close()
        await admin.close()


async def test_set_before_its_flags_it_is_not_ready_and_says_why(node: Node, admin: Admin) -> None:
    await admin.put_env("prod", ["sdk-of"])
    await admin.publish("prod", {"a": 1})
    client = RelayClient(node.ws_url, "sdk-of")
    provider = RelayProvider(client)
    api.set_provider(provider)  # before start(): no flags yet
    details = api.get_client().get_integer_details("a", 7)
    assert details.value == 7 and details.error_code is not None
    await provider.start()
    try:
        await wait_until(lambda: api.get_client().get_provider_status() == ProviderStatus.READY,
                         "READY once the flags came")
        assert api.get_client().get_integer_value("a", 7) == 1
    finally:
        await client.close()


async def test_a_snapshot_after_a_reconnect_names_exactly_what_changed(
    node: Node, admin: Admin,
) -> None:
    """Deleted while away, changed while away: named; unchanged: not."""
    await admin.put_env("prod", ["sdk-of"])
    await admin.publish("prod", {"same": 1, "edited": 1, "gone": 1})
    client = RelayClient(node.ws_url, "sdk-of")
    provider = RelayProvider(client)
    await provider.start()
    changes: list[list[str]] = []
    api.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED,
                    lambda d: d.provider_name == "relay" and changes.append(d.flags_changed or []))
    api.set_provider(provider)
    try:
        # What the client does with a snapshot after a reconnect that history did not cover.
        await client._apply_snap({"t": "snap", "v": 9, "flags": {
            "same": {"v": 1, "value": 1}, "edited": {"v": 9, "value": 2},
            "new": {"v": 9, "value": 1}}})
        await wait_until(lambda: bool(changes), "the event")
        assert changes == [["edited", "gone", "new"]]
    finally:
        await client.close()
