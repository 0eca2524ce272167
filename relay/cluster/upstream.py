"""A node's part in a cluster: the ring over the ready members, and for each environment this
node serves, where its changes come from.

For an environment it owns (or when it is alone) the node follows the store. For one another
node owns, it is an edge: it subscribes, with the version it holds, over its peer link to the
owner, which sends each change once (relay/cluster/peer_link.py,
relay/cluster/peer_server.py). When the ring changes, an environment whose owner changed is
resubscribed to the new owner with the version held; when a link goes down, its environments
are taken from the store until it is back. In every case duplicates are dropped by version
and a gap is filled from the store, so a disagreement about the ring costs duplicate work,
never a lost or reordered change.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from relay.cluster.membership.base import Membership, ready_ids
from relay.cluster.peer_link import PeerLink
from relay.core.ring import Ring
from relay.hub import Hub
from relay.metrics import Metrics

log = logging.getLogger("relay.cluster")


class Cluster:
    """The hub's `Upstream` in a cluster."""

    def __init__(self, node_id: str, peer_token: str, membership: Membership, hub: Hub,
                 metrics: Metrics, ssl_context: ssl.SSLContext | None = None) -> None:
        self.node_id = node_id
        self.ssl_context = ssl_context  # with TLS on: the peer links are wss://
        self.peer_token = peer_token
        self.membership = membership
        self.hub = hub
        self.metrics = metrics
        self.ring = Ring()
        self.links: dict[str, PeerLink] = {}
        self.following: dict[str, str] = {}  # env -> the owner it is followed through

    def links_up(self) -> int:
        """Peer links connected now (the relay_peer_links gauge)."""
        return sum(1 for link in self.links.values() if link.up)

    async def stop(self) -> None:
        for link in list(self.links.values()):
            await link.close()
        self.links.clear()

    # --- the hub's Upstream -------------------------------------------------------------------

    def follow(self, env: str, since: int) -> bool:
        owner = self.ring.owner(env)
        if owner is None or owner == self.node_id:
            return False
        link = self._link(owner)
        if link is None:
            return False
        self.following[env] = owner
        link.subscribe(env)
        return link.up  # until its link is up, the store is the source

    def unfollow(self, env: str) -> None:
        owner = self.following.pop(env, None)
        if owner is not None and owner in self.links:
            self.links[owner].unsubscribe(env)

    # --- membership ---------------------------------------------------------------------------

    def on_members(self) -> None:
        members = self.membership.members()
        ring = self.ring.with_members(ready_ids(members))
        self.metrics.ring_members.set(len(ring.members))
        if ring is self.ring:
            return
        envs = self.hub.loaded_envs()
        moved = self.ring.moved(ring, envs)
        log.info("ring: %s (%d of %d loaded environments move)", sorted(ring.members),
                 len(moved), len(envs))
        self.metrics.ownership_moves.inc(len(moved))
        self.ring = ring
        for env in envs:
            self._reassign(env)
        for node_id in list(self.links):  # links to nodes that left, once unused
            link = self.links[node_id]
            if node_id not in members and not link.envs:
                del self.links[node_id]
                self._close_later(link)

    def _reassign(self, env: str) -> None:
        owner = self.ring.owner(env)
        current = self.following.get(env)
        if owner == current:
            return
        if current is not None:
            self.unfollow(env)
        if owner is None or owner == self.node_id:
            self.hub.set_source(env, via_peer=False)
            return
        link = self._link(owner)
        if link is None:
            self.hub.set_source(env, via_peer=False)
            return
        self.following[env] = owner
        link.subscribe(env)
        self.hub.set_source(env, via_peer=link.up)

    # --- links --------------------------------------------------------------------------------

    def _link(self, node_id: str) -> PeerLink | None:
        link = self.links.get(node_id)
        if link is None:
            member = self.membership.members().get(node_id)
            if member is None:
                return None
            link = PeerLink(node_id, member.address, self.peer_token,
                            on_message=self.hub.on_upstream, since_of=self.hub.version,
                            on_up=self._link_up, on_down=self._link_down,
                            ssl_context=self.ssl_context)
            self.links[node_id] = link
            link.start()
        return link

    def _link_up(self, link: PeerLink) -> None:
        for env in link.envs:
            if self.following.get(env) == link.node_id:
                self.hub.set_source(env, via_peer=True)

    def _link_down(self, link: PeerLink) -> None:
        for env in link.envs:  # from the store until the link is back or the ring moves it
            self.hub.set_source(env, via_peer=False)

    def _close_later(self, link: PeerLink) -> None:
        task = asyncio.get_running_loop().create_task(link.close())
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
