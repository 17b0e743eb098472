"""outbox.py: the writes of one loop turn, the first at once and the rest at the turn's end.
The transports here only record what they are given (the order and timing of writes is all
there is to see); front.py's and upstream.py's tests run it over real sockets."""

import asyncio

from stickyproxy.outbox import Outbox


class Recording:
    def __init__(self, log, name):
        self.log, self.name, self.closing = log, name, False

    def write(self, data):
        self.log.append((self.name, data))

    def is_closing(self):
        return self.closing


async def test_the_first_write_of_a_turn_goes_at_once_and_the_others_at_its_end():
    log = []
    a, b = Recording(log, "a"), Recording(log, "b")
    outbox = Outbox()
    outbox.write(a, b"1")
    assert log == [("a", b"1")]  # one request at a time waits for nothing
    outbox.write(b, b"2")
    outbox.write(a, b"3")
    assert log == [("a", b"1")]
    await asyncio.sleep(0)  # the turn ends
    assert log == [("a", b"1"), ("b", b"2"), ("a", b"3")]  # in order, per connection too
    outbox.write(b, b"4")  # a new turn: at once again
    assert log[-1] == ("b", b"4")
    await asyncio.sleep(0)


async def test_flush_writes_what_is_held_now_and_skips_a_closed_connection():
    log = []
    a, b = Recording(log, "a"), Recording(log, "b")
    outbox = Outbox()
    outbox.write(a, b"1")
    outbox.write(a, b"2")
    outbox.write(b, b"3")
    b.closing = True
    outbox.flush()  # before closing a connection: its last bytes first
    assert log == [("a", b"1"), ("a", b"2")]
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("a", b"2")]  # nothing written twice


async def test_more_than_the_most_held_goes_out_at_once():
    # A transport's high-water mark must still be reached while its writer runs (so a client
    # that pipelines and reads nothing pauses its own serving), not only at the turn's end.
    from stickyproxy.outbox import MOST_HELD
    log = []
    a = Recording(log, "a")
    outbox = Outbox()
    outbox.write(a, b"first")
    big = b"x" * (MOST_HELD // 2)
    outbox.write(a, big)
    assert len(log) == 1
    outbox.write(a, big + b"!")  # over the bound: everything held goes now
    assert log == [("a", b"first"), ("a", big), ("a", big + b"!")]
    await asyncio.sleep(0)
    assert len(log) == 3


async def test_a_failing_write_does_not_lose_the_others():
    log = []

    class Broken(Recording):
        def write(self, data):
            raise RuntimeError("Cannot call write() after write_eof()")

    a, b = Recording(log, "a"), Broken(log, "b")
    outbox = Outbox()
    outbox.write(a, b"1")
    outbox.write(b, b"2")
    outbox.write(a, b"3")
    await asyncio.sleep(0)
    assert log == [("a", b"1"), ("a", b"3")]
