"""upstream.py: the per-backend connection limit (asyncio only) and how answers are read
(over a real loopback socket). The backends here are small asyncio servers written for each
case, because the cases are answers no real WebDriver server sends on purpose: split at given
points, malformed, interim, unasked, cut off or hanging (the *_functional tests drive the same
client against real PhantomJS)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from conftest import eventually
from stickyproxy import upstream as upstream_module
from stickyproxy.upstream import Deadlines, NotConnected, Slots, Upstream, UpstreamError


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


# --- answers framed three ways, from a real socket server -------------------------------------

ANSWERS = {
    "/length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\nhello",
    "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n",
    # names in Connection are for this hop only (RFC 9110 7.6.1): never passed on
    # a trailer naming a header in Connection: of this answer, never of the reader's next one
    # (the parser is lent on; "/length" after it keeps its X-Kept)
    "/trailer": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
                b"Connection: X-Kept\r\n\r\n",
    "/length-again": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Kept: yes\r\n\r\nhello",
    "/private": b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
                b"Connection: X-Other\r\nX-Other: o\r\n"  # (several add up)
                b"Content-Length: 5\r\nX-Kept: yes\r\n\r\nhello",
    "/closed": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello",  # ends with the connection
    # a coding that is not chunked: the body runs to the close too (it was taken as chunked,
    # and every such answer as cut short)
    "/identity": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\nhello",
}
CLOSED = ("/closed", "/identity")  # the answers that end with their connection (the last ones,
# so the server's side of every connection is closed by the test's end)


async def test_answers_by_length_chunked_or_closed_connection_read_whole():
    async def serve(reader, writer):  # keep-alive, except where the answer ends by closing
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            path = head.split()[1].decode()
            writer.write(ANSWERS[path])
            await writer.drain()
            if path in CLOSED:
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
    try:
        for path in ANSWERS:
            answer = await upstream.request("GET", path, [], None, timeout=5)
            try:
                assert await answer.read() == b"hello", path
                assert answer.length == (None if path in CLOSED or path in ("/chunked", "/trailer")
                                         else 5)
                assert (b"X-Kept: yes\r\n" in answer.forward) == (
                    path in ("/length", "/length-again", "/private"))
                assert b"X-Secret" not in answer.forward and b"X-Other" not in answer.forward
                assert b"Content-Length" not in answer.forward  # hop-by-hop: set by the proxy
            finally:
                answer.release()
    finally:
        upstream.close()
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def backend(handle, box: dict | None = None):
    """A loopback server running `handle(reader, writer)` per connection (`box["server"]` is the
    server, for a handler that stops it); on exit every connection is closed and its handler
    has ended (nothing outlives the test's loop)."""
    tasks: set[asyncio.Task] = set()

    async def serve(reader, writer):
        tasks.add(asyncio.current_task())
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    if box is not None:
        box["server"] = server
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def test_an_answer_with_a_length_is_awaited_whole_and_a_chunked_one_by_its_head():
    """GhostDriver sends head and body in separate segments: request() returns once a sized
    body is all here (one wake-up), but at the head of a chunked one (it may stream long)."""
    body_sent = {}

    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split()[1].decode()
            if path == "/sized":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)  # the body comes later, in its own segment
            body_sent[path] = True
            writer.write(b"hello" if path == "/sized" else b"5\r\nhello\r\n0\r\n\r\n")
            await writer.drain()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            answer = await upstream.request("GET", "/sized", [], None, timeout=5)
            assert body_sent.get("/sized") and answer.ready_body() == b"hello"
            answer.release()
            answer = await upstream.request("GET", "/chunked", [], None, timeout=5)
            assert not body_sent.get("/chunked") and answer.ready_body() is None
            assert await answer.read() == b"hello"
            answer.release()
        finally:
            upstream.close()


async def test_a_backend_that_sends_half_an_answer_times_out():
    """The timeout covers a sized body too: a head without its body is no answer."""
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        await writer.drain()
        await reader.read()  # hangs on purpose until the client gives up

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            with pytest.raises(TimeoutError):
                await upstream.request("GET", "/", [], None, timeout=0.2)
            assert upstream.in_use == 0 and upstream.free == 1  # nothing held
        finally:
            upstream.close()


async def test_each_request_times_out_on_its_own_deadline_under_one_shared_timer():
    """One timer serves every awaited answer of a backend: a shorter timeout that arrives
    after a longer one still fires first, a quick answer meanwhile is untouched, and the
    longer one still fires after it."""
    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split()[1] == b"/quick":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            else:
                await reader.read()  # hangs on purpose: this answer never comes

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=3)
        loop = asyncio.get_running_loop()
        ended: dict[str, float] = {}

        async def hang(name: str, timeout: float) -> None:
            with pytest.raises(TimeoutError):
                await upstream.request("GET", f"/{name}", [], None, timeout=timeout)
            ended[name] = loop.time() - began

        try:
            began = loop.time()
            slow = asyncio.ensure_future(hang("slow", 1.2))
            await asyncio.sleep(0.05)
            short = asyncio.ensure_future(hang("short", 0.3))
            answer = await upstream.request("GET", "/quick", [], None, timeout=5)
            assert answer.ready_body() == b"ok"
            answer.release()
            await asyncio.wait_for(asyncio.gather(slow, short), 5)  # each one fires at all
            # (before the longer deadline: a timer armed for the longer one alone fires at 1.2)
            assert 0.3 <= ended["short"] < 1.2 <= ended["slow"] < 3
            assert upstream.in_use == 0 and upstream.free == 3 and not upstream._deadlines
        finally:
            upstream.close()


# --- a new session over a kept-alive connection (replay_stale) ------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def closing_second_request(server_box: dict | None = None):
    """A backend that answers a connection's first request and, on its second, closes the
    connection unanswered (and, with `server_box`, stops listening first: a backend gone)."""
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        if server_box is not None:
            server_box["server"].close()
        writer.close()
    return serve


async def new_session(upstream: Upstream, via: str, replay_stale: bool = True):
    """POST /session through `request` (a coroutine) or `submit` (a callback): the same rule."""
    if via == "request":
        return await upstream.request("POST", "/session", [], b"{}", timeout=5,
                                      replay_stale=replay_stale)
    answers = Answers()
    upstream.submit("POST", "/session", b"", b"{}", 5, answers, replay_stale=replay_stale)
    answer, exc = await answers.next()
    if exc is not None:
        raise exc
    return answer


@pytest.mark.parametrize("via", ["request", "submit"])
async def test_a_reused_connection_that_breaks_unanswered_is_replaced_by_a_fresh_one_once(via):
    async with backend(closing_second_request()) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
        try:
            (await upstream.request("POST", "/session", [], b"{}", timeout=5)).release()
            answer = await new_session(upstream, via)
            assert answer.ready_body() == b"ok"
            answer.release()
            assert upstream.opened_total == 2 and upstream.stale_total == 1
            # Without replay_stale the same break is the caller's error (it may have been seen).
            with pytest.raises(UpstreamError):
                await new_session(upstream, via, replay_stale=False)
            assert upstream.in_use == 0 and upstream.free == 2
        finally:
            upstream.close()


@pytest.mark.parametrize("via", ["request", "submit"])
async def test_a_replayed_new_session_whose_backend_is_gone_is_not_connected(via):
    """The fresh connection's refused connect is what lets placement try another backend."""
    box: dict = {}
    async with backend(closing_second_request(box), box) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
        try:
            (await upstream.request("POST", "/session", [], b"{}", timeout=5)).release()
            with pytest.raises(NotConnected):
                await new_session(upstream, via)
            assert upstream.stale_total == 1 and upstream.in_use == 0
            assert upstream.free == 2
        finally:
            upstream.close()


@pytest.mark.parametrize("via", ["request", "submit"])
async def test_a_new_session_reuses_only_a_connection_answered_lately(monkeypatch, via):
    async def serve(reader, writer):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()

    monkeypatch.setattr(upstream_module, "WARM", 0.2)
    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
        try:
            (await upstream.request("GET", "/status", [], None, timeout=5)).release()
            (await new_session(upstream, via)).release()
            assert upstream.opened_total == 1  # warm: reused
            await asyncio.sleep(0.3)
            (await new_session(upstream, via)).release()
            assert upstream.opened_total == 2  # idle too long: a fresh one
            (await upstream.request("GET", "/status", [], None, timeout=5)).release()
            assert upstream.opened_total == 2  # commands reuse whatever is idle
        finally:
            upstream.close()


async def test_an_answer_awaited_when_the_pool_is_closed_still_times_out():
    """A backend removed (its pool closed) while a command waits on it: the command still ends
    at its deadline instead of waiting forever."""
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # hangs on purpose: this answer never comes

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        loop = asyncio.get_running_loop()
        began = loop.time()
        waiting = asyncio.ensure_future(upstream.request("GET", "/", [], None, timeout=0.3))
        await asyncio.sleep(0.05)
        upstream.close()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(waiting, 5)
        assert loop.time() - began < 2  # its own deadline, not wait_for's 5 s
        assert upstream.in_use == 0 and upstream.free == 1


# --- submit: a request answered through a callback (the command path) -----------------------

class Answers:
    """The callbacks' results, awaitable one by one."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self, answer, exc) -> None:
        self.queue.put_nowait((answer, exc))

    async def next(self):
        return await asyncio.wait_for(self.queue.get(), 5)


def numbered_answers():
    """A keep-alive backend answering each request with its path, the slowest (/slow) last;
    it closes the connection shortly after answering /bye (idle in the pool by then)."""
    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split()[1]
            if path == b"/slow":
                await asyncio.sleep(0.1)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path))
            await writer.drain()
            if path == b"/bye":
                await asyncio.sleep(0.05)
                return
    return serve


async def test_submitted_requests_wait_for_slots_in_order_and_reuse_connections():
    async with backend(numbered_answers()) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
        answers = Answers()
        try:
            for path in ("/slow", "/a", "/b", "/c", "/d"):  # 2 slots: three wait in line
                upstream.submit("GET", path, b"", None, 5, answers)
            assert upstream.free == 0 and len(upstream._waiters) == 3
            got = []
            for _ in range(5):
                answer, exc = await answers.next()
                assert exc is None
                got.append(answer.ready_body())
                answer.release()  # hands the slot (and the connection) to the next in line
            assert got == [b"/a", b"/b", b"/c", b"/d", b"/slow"]  # waiters in order behind /a
            assert upstream.opened_total == 2  # the line reused the two connections
            assert upstream.in_use == 0 and upstream.free == 2 and not upstream._deadlines
        finally:
            upstream.close()


async def test_a_submitted_request_to_a_refused_port_is_not_connected():
    async with backend(numbered_answers()) as port:
        pass  # closed: nothing listens there now
    upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
    answers = Answers()
    upstream.submit("GET", "/a", b"", None, 5, answers)
    answer, exc = await answers.next()
    assert answer is None and isinstance(exc, NotConnected)
    assert upstream.in_use == 0 and upstream.free == 1


async def test_a_submitted_request_times_out_or_breaks_and_frees_its_slot():
    async def serve(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        if head.split()[1] == b"/break":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
            await writer.drain()
            writer.transport.abort()
            return
        await reader.read()  # hangs on purpose: this answer never comes

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        loop = asyncio.get_running_loop()
        answers = Answers()
        try:
            began = loop.time()
            upstream.submit("GET", "/hang", b"", None, 0.3, answers)
            answer, exc = await answers.next()
            assert answer is None and isinstance(exc, TimeoutError)
            assert 0.29 <= loop.time() - began < 2
            upstream.submit("GET", "/break", b"", None, 5, answers)
            answer, exc = await answers.next()  # half a body, then the connection is gone
            assert answer is None and isinstance(exc, UpstreamError)
            assert upstream.in_use == 0 and upstream.free == 1 and not upstream._deadlines
        finally:
            upstream.close()


async def test_a_callback_may_release_and_submit_again_on_the_same_connection():
    """The callback runs after the parser is done with the data, so the connection it frees
    can carry the next request at once (a pipelined client's next command)."""
    async with backend(numbered_answers()) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        answers = Answers()
        bodies = []

        def chained(answer, exc) -> None:
            bodies.append(answer.ready_body())
            answer.release()
            if len(bodies) < 3:
                upstream.submit("POST", f"/{len(bodies)}", b"", b"{}", 5, chained)
            else:
                answers(None, None)

        try:
            upstream.submit("POST", "/0", b"", b"{}", 5, chained)
            await answers.next()
            assert bodies == [b"/0", b"/1", b"/2"] and upstream.opened_total == 1
        finally:
            upstream.close()


async def test_a_deadline_set_during_a_sweep_is_kept_even_if_earlier_than_the_rest():
    # An expiry's callback may send the next request at once (a queued one takes the slot):
    # its deadline, earlier than the others left, must still fire on time.
    loop = asyncio.get_running_loop()
    deadlines = Deadlines()
    expired = []

    class Awaited:  # what Deadlines needs of an upstream._Connection
        def __init__(self, name, then=None):
            self._loop, self.name, self.then = loop, name, then

        def _expire(self):
            expired.append((self.name, loop.time()))
            del deadlines.due[self]
            if self.then:
                deadlines.watch(*self.then)

    deadlines.watch(Awaited("slow"), 30)
    quick = Awaited("quick")
    deadlines.watch(Awaited("first", then=(quick, 0.1)), 0.05)
    start = loop.time()
    await eventually(lambda: len(expired) >= 2, timeout=5)
    assert [name for name, _ in expired] == ["first", "quick"]
    assert expired[1][1] - start < 1  # not at the 30 s one's time


# --- parsers lent per answer (upstream._Reader) ------------------------------------------------

# The head of an answer nobody asked for, its body still to come: a parser that took it for
# the next answer would read the next real one as its body.
UNASKED = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"


async def body_of(upstream: Upstream, path: str) -> bytes:
    """One submitted GET's whole body (the answer released)."""
    answers = Answers()
    upstream.submit("GET", path, b"", None, 5, answers)
    answer, exc = await answers.next()
    assert exc is None, exc
    try:
        return answer.ready_body()
    finally:
        answer.release()


async def test_bytes_after_a_whole_answer_keep_the_answer_but_not_the_connection():
    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split()[1]
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path)
            writer.write(answer + UNASKED if path == b"/a" else answer)
            await writer.drain()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            assert await body_of(upstream, "/a") == b"/a"  # the answer itself stands
            assert await body_of(upstream, "/b") == b"/b"
            assert upstream.opened_total == 2  # the first connection was not trusted again
        finally:
            upstream.close()


async def test_bytes_nobody_asked_for_close_an_idle_connection():
    sent = asyncio.Event()

    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split()[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(path), path))
            await writer.drain()
            if path == b"/a":
                await asyncio.sleep(0.05)  # the connection is idle in the pool by now
                writer.write(UNASKED)
                await writer.drain()
                sent.set()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            assert await body_of(upstream, "/a") == b"/a"
            await asyncio.wait_for(sent.wait(), 5)
            await eventually(lambda: upstream._top is None or upstream._top.lost, timeout=5,
                             what="the idle connection closed")
            assert await body_of(upstream, "/b") == b"/b"
            assert upstream.opened_total == 2
        finally:
            upstream.close()


async def test_answers_split_over_segments_on_two_connections_at_once_each_read_whole():
    """Each connection keeps its parser while its answer is unfinished; a finished keep-alive
    one lends its parser to the next answer, whichever connection it comes on."""
    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split()[1]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Path: " % len(path))
            await writer.drain()
            await asyncio.sleep(0.1)  # both answers are half read now
            writer.write(b"%b\r\n\r\n%b" % (path, path))
            await writer.drain()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
        other = Upstream(f"http://127.0.0.1:{port}", limit=1)
        answers = Answers()
        try:
            upstream.submit("GET", "/first", b"", None, 5, answers)
            upstream.submit("GET", "/second", b"", None, 5, answers)
            got = set()
            for _ in range(2):
                answer, exc = await answers.next()
                body = answer.ready_body()
                assert exc is None and b"X-Path: %b\r\n" % body in answer.forward
                got.add(body)
                answer.release()
            assert got == {b"/first", b"/second"} and upstream.opened_total == 2
            lent = upstream_module._readers[-1]
            assert await body_of(other, "/third") == b"/third"
            assert upstream_module._readers[-1] is lent  # the same parser read it, and is back
        finally:
            upstream.close()
            other.close()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(piece), piece) for piece in pieces)


async def test_body_pieces_come_out_in_order_however_they_arrive_and_are_taken():
    """The first piece held is kept apart from the rest (upstream._Connection._first): pieces
    taken one by one, some while more arrive, and a sized body in three segments, keep their
    order."""
    go = asyncio.Event()

    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.split()[1] == b"/sized":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
                for piece in (b"ab", b"cd", b"ef"):
                    await writer.drain()
                    await asyncio.sleep(0.02)
                    writer.write(piece)
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunked(b"a", b"b", b"c"))
            for batch in (chunked(b"d", b"e"), chunked(b"f") + b"0\r\n\r\n"):
                await writer.drain()
                await go.wait()
                go.clear()
                writer.write(batch)
            await writer.drain()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            answer = await upstream.request("GET", "/chunked", [], None, timeout=5)
            chunks = answer.chunks()
            got = [await anext(chunks)]
            await eventually(lambda: answer._conn._buffered == 2, timeout=5, what="b, c held")
            go.set()  # d, e arrive while b and c are held
            await eventually(lambda: answer._conn._buffered == 4, timeout=5, what="d, e held")
            got += [await anext(chunks) for _ in range(4)]
            go.set()  # f arrives with nothing held
            got += [piece async for piece in chunks]
            assert got == [b"a", b"b", b"c", b"d", b"e", b"f"]
            answer.release()
            answer = await upstream.request("GET", "/sized", [], None, timeout=5)
            assert answer.ready_body() == b"abcdef"
            answer.release()
            assert upstream.opened_total == 1
        finally:
            upstream.close()


async def test_a_long_body_released_unread_leaves_its_connection_readable():
    """A body over the high-water mark pauses reading; if the whole of it is in and the answer
    is released unread (a client that left mid-stream), the connection goes back to the pool
    reading again, or the next answer on it is never read."""
    big = b"x" * (upstream_module._HIGH_WATER + 200_000)

    async def serve(reader, writer):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = big if head.split()[1] == b"/big" else b"ok"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
            await writer.drain()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            answer = await upstream.request("GET", "/big", [], None, timeout=5)
            await eventually(lambda: answer._conn._done, timeout=5, what="the whole body in")
            assert answer._conn._paused  # (the case: whole, and paused)
            answer.release()
            assert await body_of(upstream, "/small") == b"ok"
            assert upstream.opened_total == 1
        finally:
            upstream.close()


@pytest.mark.parametrize("via", ["request", "submit"])
async def test_interim_answers_are_read_past(via):
    async def serve(reader, writer):
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)  # the interim answer alone first, as a backend would
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Real: yes\r\n\r\nok")
            await writer.drain()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        try:
            for _ in range(2):  # and the connection stays usable
                answer = await new_session(upstream, via, replay_stale=False)
                assert answer.status == 200 and answer.ready_body() == b"ok"
                assert answer.forward == b"X-Real: yes\r\n"
                answer.release()
            assert upstream.opened_total == 1
        finally:
            upstream.close()


async def test_a_backend_that_switches_protocols_unasked_fails_at_once():
    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with backend(serve) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=1)
        loop = asyncio.get_running_loop()
        try:
            began = loop.time()
            with pytest.raises(UpstreamError, match="switched protocols"):
                await new_session(upstream, "submit", replay_stale=False)
            assert loop.time() - began < 2  # not at its 5 s deadline
            assert upstream.in_use == 0 and upstream.free == 1
        finally:
            upstream.close()


async def test_the_warm_rule_looks_past_an_idle_connection_that_closed(monkeypatch):
    """A new session reuses a connection only if it was answered lately: when the warmest idle
    one has closed, the rule applies to the next one, not to the closed one's time."""
    monkeypatch.setattr(upstream_module, "WARM", 0.2)
    async with backend(numbered_answers()) as port:
        upstream = Upstream(f"http://127.0.0.1:{port}", limit=2)
        try:
            await asyncio.gather(body_of(upstream, "/slow"), body_of(upstream, "/quick"))
            assert upstream.opened_total == 2
            await asyncio.sleep(0.3)  # both idle longer than WARM
            await body_of(upstream, "/bye")  # the warmest one answers, then closes
            await eventually(lambda: upstream._top.lost, timeout=5, what="it closed")
            (await new_session(upstream, "submit")).release()
            assert upstream.opened_total == 3  # the other one is cold: a fresh connection
        finally:
            upstream.close()
