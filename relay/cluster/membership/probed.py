"""Membership by probing: candidate addresses (a static list, or DNS answers) are asked for
their `/readyz` every interval; a node that answers is a member with the state it reports, one
that does not is not a member. Shared by `static` and `dns`.

With TLS on (`ssl_context`, the node's client context) the probes are https: a peer whose
certificate is not trusted, or that does not speak TLS, is not a member, and the reason is
logged once per peer (again only after it changed or the peer answered meanwhile)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable

import aiohttp

from relay.cluster.membership.base import Member, MemberView
from relay.tasks import cancel_and_wait, raise_if_cancelled
from relay.tls import peer_failure

log = logging.getLogger("relay.membership")

Self = Callable[[], Member]  # this node as it stands now


class ProbedMembership(MemberView):
    def __init__(self, candidates: Callable[[], Awaitable[list[str]]], local: Self,
                 interval: float = 1.0, timeout: float = 1.0,
                 ssl_context: ssl.SSLContext | None = None,
                 on_start: Callable[[], None] | None = None) -> None:
        super().__init__(local)
        self._on_start = on_start  # (a check of this node's configuration, once it is bound)
        self.ssl_context = ssl_context
        self._scheme = "https" if ssl_context is not None else "http"
        self._tls_failures: dict[str, str] = {}  # address -> the reason last logged
        self._clashes: set[str] = set()  # node ids answered twice, as last logged
        self._candidates = candidates
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._on_start is not None:
            self._on_start()
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(
                ssl=self.ssl_context if self.ssl_context is not None else True))
        await self._round()  # a first view before the node serves
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            raise_if_cancelled()
            try:
                await self._round()
            except Exception:
                raise_if_cancelled()
                log.exception("membership probe round failed")

    async def _round(self) -> None:
        local = self._local()
        addresses = [a for a in await self._candidates() if a != local.address]
        answers = await asyncio.gather(*(self._probe(a) for a in addresses))
        for gone in self._tls_failures.keys() - set(addresses):
            del self._tls_failures[gone]
        seen: dict[str, Member] = {}
        clashes: set[str] = set()
        for member in answers:
            if member is None:
                continue
            other = seen.get(member.node_id)
            if member.node_id == local.node_id:
                clashes.add(f"the node at {member.address} says it is {member.node_id}, this "
                            "node's id")
            elif other is not None:
                clashes.add(f"the nodes at {other.address} and {member.address} both say they "
                            f"are {member.node_id}")
            else:
                seen[member.node_id] = member
        for clash in clashes - self._clashes:  # once each, while it lasts
            log.warning("%s: every node needs its own --node-id (RELAY_NODE_ID); until then "
                        "the rings disagree", clash)
        self._clashes = clashes
        self._seen = seen
        self.changed()

    async def _probe(self, address: str) -> Member | None:
        assert self._session is not None
        try:
            async with self._session.get(f"{self._scheme}://{address}/readyz") as resp:
                body = await resp.json(content_type=None)
        except aiohttp.ClientSSLError as exc:
            self._tls_failed(address, exc)
            return None
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            return None
        self._tls_failures.pop(address, None)
        if not isinstance(body, dict) or not isinstance(body.get("node"), str):
            return None
        return Member(body["node"], address, str(body.get("state", "unknown")),
                      int(body.get("connections", 0)))

    def _tls_failed(self, address: str, exc: aiohttp.ClientSSLError) -> None:
        """Log why a peer is not a member, once: a certificate this node does not trust, or a
        handshake that failed (a peer without TLS: a cluster is all-TLS or all-plain)."""
        reason = peer_failure(exc.os_error)
        if self._tls_failures.get(address) != reason:
            self._tls_failures[address] = reason
            log.warning("peer %s is not a member: %s", address, reason)

