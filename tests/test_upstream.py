"""upstream.Slots: the per-backend connection limit (no sockets: asyncio only)."""

from __future__ import annotations

import asyncio

from stickyproxy.upstream import Slots


async def test_slots_are_taken_without_waiting_until_none_is_free():
    slots = Slots(2)
    await slots.acquire()
    await slots.acquire()
    assert slots.free == 0
    slots.release()
    slots.release()
    assert slots.free == 2


async def test_waiters_get_released_slots_in_order_and_no_newcomer_overtakes():
    slots, order = Slots(1), []
    await slots.acquire()

    async def take(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first = asyncio.ensure_future(take("first"))
    second = asyncio.ensure_future(take("second"))
    await asyncio.sleep(0)
    slots.release()  # handed to "first", not counted as free
    assert slots.free == 0
    late = asyncio.ensure_future(take("late"))
    await asyncio.sleep(0)
    assert order == ["first"]
    slots.release()
    slots.release()
    await asyncio.gather(first, second, late)
    assert order == ["first", "second", "late"]
    slots.release()
    assert slots.free == 1


async def test_a_cancelled_waiter_gives_no_slot_away_and_loses_none():
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    slots.release()
    assert slots.free == 1  # the cancelled waiter was skipped


async def test_a_waiter_cancelled_just_after_being_handed_a_slot_passes_it_on():
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled()
    assert slots.free == 1
