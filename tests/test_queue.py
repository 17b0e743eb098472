"""The new-session queue with a scripted picker: FIFO, no barging, timeouts, disconnects."""

import asyncio
import time

import pytest

from stickyproxy.queue import QueueFull, SessionQueue


class Slots:
    """A picker over `free` slots of one backend, recording reservations."""

    def __init__(self, free=0):
        self.free = free
        self.released = 0

    def pick(self, cookie, tried):
        if self.free:
            self.free -= 1
            return "b1"
        return None

    def release(self, backend_id):
        self.free += 1
        self.released += 1


async def test_first_in_first_served_and_no_barging():
    slots = Slots()
    queue = SessionQueue(slots.pick, slots.release, 10)
    served = []

    async def waiter(name):
        await queue.wait(None, (), 5)
        served.append(name)

    tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
    await asyncio.sleep(0)
    assert len(queue) == 3
    slots.free = 1
    assert queue.admit(None) is None  # a newcomer may not take the freed slot...
    queue.dispatch()  # ...it goes to the head of the queue
    await asyncio.sleep(0)
    assert served == ["a"]
    slots.free = 2
    queue.dispatch()
    await asyncio.gather(*tasks)
    assert served == ["a", "b", "c"] and len(queue) == 0


async def test_admit_takes_a_free_slot_when_nobody_waits():
    slots = Slots(free=1)
    queue = SessionQueue(slots.pick, slots.release, 10)
    assert queue.admit(None) == "b1"
    assert queue.admit(None) is None


async def test_timeout_leaves_the_queue():
    slots = Slots()
    queue = SessionQueue(slots.pick, slots.release, 10)
    with pytest.raises(TimeoutError):
        await queue.wait(None, (), 0.05)
    assert len(queue) == 0 and queue.timeouts_total == 1


async def test_a_cancelled_waiter_leaves_at_once_and_gives_back_a_slot_it_was_handed():
    slots = Slots()
    queue = SessionQueue(slots.pick, slots.release, 10)
    first = asyncio.create_task(queue.wait(None, (), 5))
    second = asyncio.create_task(queue.wait(None, (), 5))
    await asyncio.sleep(0)
    first.cancel()  # its client disconnected
    await asyncio.sleep(0)
    assert len(queue) == 1 and queue.abandoned_total == 1
    slots.free = 1
    queue.dispatch()
    second.cancel()  # handed the slot, but cancelled before it could use it
    with pytest.raises(asyncio.CancelledError):
        await second
    assert slots.released == 1 and slots.free == 1


async def test_a_full_queue_refuses_at_once():
    slots = Slots()
    queue = SessionQueue(slots.pick, slots.release, 1)
    task = asyncio.create_task(queue.wait(None, (), 5))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull):
        await queue.wait(None, (), 5)
    assert queue.refused_total == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_retry_that_may_not_use_the_free_backend_keeps_its_place_but_blocks_nobody():
    free = {"b1": 0, "b2": 0}

    def pick(cookie, tried):
        for backend_id, n in free.items():
            if n and backend_id not in tried:
                free[backend_id] -= 1
                return backend_id
        return None

    queue = SessionQueue(pick, lambda backend_id: None, 10)
    retry = asyncio.create_task(queue.wait(None, ("b2",), 5))  # its attempt on b2 failed
    await asyncio.sleep(0)
    free["b2"] = 1
    queue.dispatch()  # b2 is free, but not for the retry at the head
    await asyncio.sleep(0)
    assert not retry.done() and len(queue) == 1
    assert queue.admit(None) is None  # a newcomer queues behind it, as always...
    newcomer = asyncio.create_task(queue.wait(None, (), 5))
    assert await asyncio.wait_for(newcomer, 1) == "b2"  # ...and takes b2 at once
    free["b1"] = 1
    queue.dispatch()
    assert await asyncio.wait_for(retry, 1) == "b1"
    assert len(queue) == 0


async def test_a_waiter_back_at_the_head_goes_first_uncounted_and_keeps_its_age():
    slots = Slots()
    queue = SessionQueue(slots.pick, slots.release, 1)  # full with one waiter
    behind = asyncio.create_task(queue.wait(None, (), 5))
    await asyncio.sleep(0)
    first_queued = time.monotonic() - 10  # its first stay in the queue began 10 s ago
    back = asyncio.create_task(queue.wait(None, (), 5, since=first_queued))
    await asyncio.sleep(0)
    assert len(queue) == 2 and queue.waited_total == 1 and queue.refused_total == 0
    assert queue.oldest_wait(time.monotonic()) >= 10
    slots.free = 1
    queue.dispatch()
    assert await back == "b1" and not behind.done()
    assert queue.wait_seconds_max >= 10  # the whole wait...
    assert queue.wait_seconds_total < 5  # ...but only this stay added (the first, when it ended)
    behind.cancel()
    with pytest.raises(asyncio.CancelledError):
        await behind
