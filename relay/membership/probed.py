"""Membership by probing: candidate addresses (a static list, or DNS answers) are asked for
their `/readyz` every interval; a node that answers is a member with the state it reports, one
that does not is not a member. Shared by `static` and `dns`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from relay.membership.base import Member, MemberView
from relay.tasks import raise_if_cancelled

log = logging.getLogger("relay.membership")

Self = Callable[[], Member]  # this node as it stands now


class ProbedMembership(MemberView):
    def __init__(self, candidates: Callable[[], Awaitable[list[str]]], local: Self,
                 interval: float = 1.0, timeout: float = 1.0) -> None:
        super().__init__(local)
        self._candidates = candidates
        self.interval = interval
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout))
        await self._round()  # a first view before the node serves
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
        self._seen = {m.node_id: m for m in answers if m is not None and m.node_id != local.node_id}
        self.changed()

    async def _probe(self, address: str) -> Member | None:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{address}/readyz") as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError):
            return None
        if not isinstance(body, dict) or not isinstance(body.get("node"), str):
            return None
        return Member(body["node"], address, str(body.get("state", "unknown")),
                      int(body.get("connections", 0)))
