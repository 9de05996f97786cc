"""A source's concurrency slots shared by every process that calls it, leased through the fact store's
PostgreSQL (``factstore/budgets.py`` holds the statements and the design; ``shared_limits.py`` pairs
these slots with the shared rate).

Held slots pass from request to request inside the process. More are taken from the database, as many
as requests wait for: polling while none is free and the process holds less than its fair share,
looking again now and then once it holds that; a slot idle for ``linger`` goes back, and all of them
are renewed every third of their lease by a background task. When another process is short of its
share, slots beyond this one's share go back as they are released, and the rest once held for
``turn``, so that processes take turns when there are more of them than slots.

All database calls run in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from enrichment_assets.factstore.budgets import SlotDemand, SourceBudgets

log = logging.getLogger(__name__)


class SharedSlots:
    """Concurrency slots for one source, leased from the shared budget. ``async with slots.hold():``."""

    POLL_SECONDS = 0.025
    # How often a process holding its fair share looks for slots others have freed.
    RECHECK_SECONDS = 0.5

    def __init__(
        self,
        budgets: SourceBudgets,
        source: str,
        limit: int,
        *,
        holder: str,
        lease: float = 10.0,
        linger: float = 0.2,
        turn: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.lease = lease
        self.linger = linger
        self.turn = turn
        self.cooldown = 4 * self.POLL_SECONDS
        self.round_trips = 0
        self._demand = SlotDemand(other_holders=0, wanted_by_other=False)
        self._budgets = budgets
        self._source = source
        self._holder = holder
        self._clock = clock
        self._taken_at: dict[int, float] = {}  # every slot held, by when it was taken
        self._idle: dict[int, float] = {}  # held slots no request is using, by since when
        self._waiters: deque[asyncio.Future[int]] = deque()
        self._taker: asyncio.Task[None] | None = None
        self._poll_now = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._rng = random.Random()

    @property
    def held(self) -> int:
        return len(self._taken_at)

    @property
    def fair_share(self) -> int:
        """The limit over the processes that hold or want slots (as last heard), rounded up."""
        processes = 1 + self._demand.other_holders + int(self._demand.wanted_by_other)
        return math.ceil(self.limit / processes)

    def learn(self, demand: SlotDemand) -> None:
        """What the latest database call said about other processes and this source's slots."""
        self._demand = demand

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        slot = await self._acquire()
        try:
            yield
        finally:
            self._release(slot)

    async def aclose(self) -> None:
        """Stop the background tasks and hand every held slot back."""
        for task in (self._taker, self._keeper, *self._background):
            if task is not None:
                task.cancel()
        for waiter in self._waiters:
            waiter.cancel()
        slots, self._taken_at, self._idle = list(self._taken_at), {}, {}
        if slots:
            await self._call(self._budgets.give_back, slots=slots)

    async def _acquire(self) -> int:
        if self._idle and not self._waiters:
            return self._idle.popitem()[0]
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._start_taker()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(waiter.result())
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def _release(self, slot: int) -> None:
        taken_at = self._taken_at.get(slot)
        if taken_at is None:
            return  # its lease was lost or it was handed back meanwhile
        self._drop_done_waiters()
        over_share = self.held > self.fair_share or self._clock() - taken_at >= self.turn
        if self._waiters and self._demand.wanted_by_other and over_share:
            # Another process is short of its share: hand this slot back where only that process may
            # take it for a moment, if this one holds more than its share, or else once its turn
            # with the slot is over (more processes than slots take turns). This process's waiters
            # go on asking the database.
            del self._taken_at[slot]
            self._spawn(self._call(self._budgets.give_back, slots=[slot], keep_out=True))
            self._start_taker(poll_now=True)
        elif self._waiters:
            self._waiters.popleft().set_result(slot)
        else:
            self._idle[slot] = self._clock()

    def _drop_done_waiters(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    def _start_taker(self, *, poll_now: bool = False) -> None:
        """``poll_now``: this process just gave slots up, so a taker pausing at its fair share should
        ask again at the polling pace."""
        if self._taker is None or self._taker.done():
            self._taker = asyncio.ensure_future(self._take())
        elif poll_now:
            self._poll_now.set()

    async def _take(self) -> None:
        try:
            while True:
                self._waiters = deque(w for w in self._waiters if not w.done())
                room = self.fair_share if self._demand.wanted_by_other else self.limit
                wanted = min(len(self._waiters), room - self.held)
                if wanted <= 0:
                    return  # releases will serve whoever waits
                taken = await self._call(
                    self._budgets.take_slots,
                    held=len(self._taken_at),
                    limit=self.limit,
                    count=wanted,
                    lease=self.lease,
                    cooldown=self.cooldown,
                    wanted_for=10 * self.POLL_SECONDS,
                )
                self._demand = SlotDemand(taken.other_holders, self._demand.wanted_by_other)
                now = self._clock()
                for slot in taken.slots:
                    self._taken_at[slot] = now
                    self._drop_done_waiters()
                    if self._waiters:
                        self._waiters.popleft().set_result(slot)
                    else:
                        self._idle[slot] = now
                if taken.slots:
                    self._start_keeper()
                if len(taken.slots) < wanted:
                    pause = self.POLL_SECONDS if self.held < self.fair_share else self.RECHECK_SECONDS
                    self._poll_now.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._poll_now.wait(), pause * self._rng.uniform(0.5, 1.5))
        except Exception as error:  # handed to the requests waiting, which fail with it
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            self._waiters.clear()

    def _start_keeper(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.ensure_future(self._keep())

    async def _keep(self) -> None:
        """While slots are held: hand back those idle for ``linger``, renew the rest's leases."""
        renew_at = self._clock() + self.lease / 3
        while self._taken_at:
            await asyncio.sleep(min(self.linger / 2, max(renew_at - self._clock(), 0.0)))
            now = self._clock()
            idle = [slot for slot, since in self._idle.items() if now - since >= self.linger]
            for slot in idle:
                del self._idle[slot], self._taken_at[slot]
            try:
                if idle:
                    await self._call(self._budgets.give_back, slots=idle)
                if now >= renew_at and self._taken_at:
                    await self._renew()
                    renew_at = now + self.lease / 3
            except Exception:  # a lease not renewed is lost safely; one not handed back runs out
                log.warning("%s: slot lease upkeep failed; trying again", self._source, exc_info=True)

    async def _renew(self) -> None:
        held = dict(self._taken_at)
        renewed = set(await self._call(self._budgets.renew_slots, slots=list(held), lease=self.lease))
        lost = [slot for slot in held if slot not in renewed and self._taken_at.get(slot) == held[slot]]
        if lost:
            log.warning("%s: the leases on slots %s ran out before they were renewed", self._source, lost)
            for slot in lost:
                self._taken_at.pop(slot, None)
                self._idle.pop(slot, None)
            self._start_taker(poll_now=True)

    async def _call(self, method: Callable[..., Any], **kwargs: Any) -> Any:
        self.round_trips += 1
        return await asyncio.to_thread(method, self._source, holder=self._holder, **kwargs)

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
