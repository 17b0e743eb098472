"""front.py, the WebDriver port's HTTP/1.1 server, over real loopback sockets.

The handler here is the test's own (echoing what it was sent), so each HTTP behaviour is seen
by itself; the WebDriver behaviour on top of it is tested through the real proxy elsewhere."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import eventually
from stickyproxy import front
from stickyproxy.front import LATER, BadRequest, BodyTooLarge, Connection, Port, Request

JSON = (b"Content-Type", b"application/json")


def bad_request(why, client):
    status = 400 if why is not None else 500
    return status, [JSON], json.dumps({"value": {"error": "x", "message": why or "failed"}}).encode()


def too_many(client):
    return 429, [JSON], b'{"value": {"error": "unknown error", "message": "too many"}}'


class Echo:
    """Answers every request with what it saw; some paths misbehave on purpose."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def __call__(self, request: Request) -> None:
        self.started.append(request.target)
        try:
            if request.target.startswith("/slow"):
                await asyncio.sleep(float(request.target.split("=")[1]))
            if request.target == "/hang":
                await asyncio.sleep(60)
            if request.target == "/boom":
                raise RuntimeError("a bug")
            if request.target == "/flood":  # more than socket buffers hold: writes must wait
                async def flood():
                    for _ in range(400):
                        yield b"x" * 65536
                await request.stream(200, [JSON], flood())
                return
            if request.target == "/204-streamed":  # a relayed answer without a length
                async def nothing():
                    return
                    yield
                await request.stream(204, [JSON], nothing())
                return
            if request.target == "/forward":  # the header lines a proxy would pass on
                request.send(200, [JSON], json.dumps(request.forward.decode()).encode())
                return
            if request.target == "/204":
                request.send(204, [JSON], b"")
                return
            if request.target == "/stream":
                async def parts():
                    for i in range(3):
                        yield b"part%d;" % i
                await request.stream(200, [JSON], parts())
                return
            if (request.content_length or 0) > 64:  # the port's max_body, as the proxy checks it
                request.send(413, [JSON], b'{"too": "large"}', close=True)
                return
            try:
                body = await request.read()
            except BodyTooLarge:
                request.send(413, [JSON], b'{"too": "large"}', close=True)
                return
            answer = {"method": request.method, "target": request.target, "body": body.decode(),
                      "cookie": request.headers.get("cookie")}
            request.send(200, [JSON], json.dumps(answer).encode())
        except asyncio.CancelledError:
            self.cancelled.append(request.target)
            raise


@pytest.fixture
async def port():
    echo = Echo()
    server = Port(echo, idle_timeout=0.5, max_header_size=1024, max_body=64, max_connections=3,
                  on_bad_request=bad_request, on_too_many=too_many)
    host, number = await server.start("127.0.0.1", 0)
    server.echo, server.number, server.clients = echo, number, []
    yield server
    for writer in server.clients:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    await server.close(grace=1)


async def connect(port: Port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port.number)
    port.clients.append(writer)  # closed by the fixture
    return reader, writer


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), 5)  # close-delimited
    return status, headers, body


async def last_answer(port: Port, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data` on a new connection; its answer, which must say and do Connection: close."""
    reader, writer = await connect(port)
    writer.write(data)
    status, headers, body = await read_answer(reader)
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    return status, headers, body


def get(target: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {target} HTTP/{version}\r\nHost: x\r\n{extra}\r\n".encode()


async def test_keep_alive_serves_several_requests_on_one_connection(port):
    reader, writer = await connect(port)
    for target in ("/a", "/b?q=1"):
        writer.write(get(target, "Cookie: one\r\nCookie: two\r\n"))
        status, headers, body = await read_answer(reader)
        assert status == 200 and "connection" not in headers
        assert json.loads(body) == {"method": "GET", "target": target, "body": "",
                                    "cookie": "one; two"}
    writer.close()


async def test_pipelined_requests_are_answered_in_order(port):
    reader, writer = await connect(port)
    writer.write(get("/slow?s=0.2") + get("/slow?s=0") + get("/c"))
    targets = [json.loads((await read_answer(reader))[2])["target"] for _ in range(3)]
    assert targets == ["/slow?s=0.2", "/slow?s=0", "/c"]
    writer.close()


async def test_bodies_by_length_and_chunked_and_expect_continue(port):
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    assert json.loads((await read_answer(reader))[2])["body"] == "hello"
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert json.loads((await read_answer(reader))[2])["body"] == "abcde"
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    assert json.loads((await read_answer(reader))[2])["body"] == "ok"
    writer.close()


async def test_expect_continue_over_the_limit_is_refused_without_inviting_the_upload(port):
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    status, _, body = await asyncio.wait_for(read_answer(reader), 5)
    assert status == 413 and json.loads(body) == {"too": "large"}
    writer.close()


async def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(port):
    status, _, _ = await last_answer(
        port, b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"20\r\n" + b"a" * 32 + b"\r\n" + b"30\r\n" + b"b" * 48 + b"\r\n0\r\n\r\n")
    assert status == 413


async def test_streamed_answers_are_chunked_for_http11_and_close_delimited_for_http10(port):
    reader, writer = await connect(port)
    writer.write(get("/stream"))
    status, headers, body = await read_answer(reader)
    assert headers["transfer-encoding"] == "chunked" and body == b"part0;part1;part2;"
    writer.write(get("/a"))  # still usable afterwards
    assert (await read_answer(reader))[0] == 200
    writer.close()
    status, headers, body = await last_answer(port, get("/stream", version="1.0"))
    assert "transfer-encoding" not in headers and body == b"part0;part1;part2;"


async def test_http10_and_connection_close_end_the_connection_after_the_answer(port):
    for request in (get("/a", version="1.0"), get("/a", "Connection: close\r\n")):
        assert (await last_answer(port, request))[0] == 200


async def test_a_client_that_leaves_cancels_its_handler(port):
    reader, writer = await connect(port)
    writer.write(get("/hang"))
    await eventually(lambda: "/hang" in port.echo.started)
    writer.close()
    await eventually(lambda: port.echo.cancelled == ["/hang"])


async def test_a_client_that_stops_reading_a_long_answer_and_leaves_cancels_it(port):
    reader, writer = await connect(port)
    writer.write(get("/flood"))
    await asyncio.wait_for(reader.readexactly(1000), 5)  # the answer has started; read no more
    await eventually(lambda: any(c._drain is not None for c in port.connections))  # write-paused
    writer.transport.abort()
    await eventually(lambda: port.echo.cancelled == ["/flood"])


async def test_answers_gathered_in_the_turn_their_connection_is_closed_still_arrive(port):
    reader, writer = await connect(port)
    writer.write(get("/a"))
    await read_answer(reader)
    conn = next(iter(port.connections))
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none"
    two = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ntwo"
    conn.write(one, False)  # the turn's first write: at once
    conn.write(two, False)  # held for the turn's end...
    conn.close_when_idle()  # ...which the close must not outrun (as at shutdown)
    assert await asyncio.wait_for(reader.read(), 5) == one + two


async def test_idle_connections_are_closed_after_the_idle_timeout(port):
    reader, writer = await connect(port)
    writer.write(get("/a"))
    await read_answer(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server (0.5 s)


@pytest.mark.parametrize("trickled", [
    get("/a", "X-Slow: " + "a" * 200 + "\r\n"),  # a head that never ends
    b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n" + b"x" * 59,  # a small body
], ids=["head", "body"])
async def test_a_request_trickled_a_byte_at_a_time_does_not_keep_its_connection(port, trickled):
    """Each byte used to restart the idle clock: one request head sent slowly enough held the
    connection (and a --max-connections place) for good."""
    reader, writer = await connect(port)
    closed = asyncio.ensure_future(reader.read())
    try:
        for byte in trickled[:40]:  # a byte every 0.05 s: 2 s, four idle timeouts
            if closed.done():
                break
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)
        assert closed.done() and closed.result() == b""  # closed mid-trickle, nothing answered
    finally:
        closed.cancel()
        writer.close()


@pytest.mark.parametrize("data, why", [
    (b"FO\x01O / HTTP/1.1\r\n\r\n", "Invalid method"),
    (get("/a", "X-Big: " + "a" * 2000 + "\r\n"), "longer than 1024 bytes"),
    (get("/" + "a" * 2000), "request target longer than 1024 bytes"),
])
async def test_unparseable_requests_get_the_bad_request_answer_and_the_connection_ends(
        port, data, why):
    status, _, body = await last_answer(port, data)
    assert status == 400
    assert why.lower() in json.loads(body)["value"]["message"].lower()


async def test_a_header_that_never_ends_is_refused_while_it_grows(port):
    """httptools copies a header whole, piece by piece, before the length check could see it:
    a header sent without end cost the event loop quadratic time (seconds for 100 MB) and its
    memory, for every client, before any answer."""
    reader, writer = await connect(port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: ")
    answered = asyncio.ensure_future(read_answer(reader))
    for _ in range(20):  # 20 KB, in pieces, never ended: refused once past twice the limit
        if answered.done():
            break
        writer.write(b"a" * 1000)
        await asyncio.sleep(0.02)
    status, headers, body = await asyncio.wait_for(answered, 5)
    assert status == 400 and headers["connection"] == "close"
    assert "longer than 1024 bytes" in json.loads(body)["value"]["message"]
    assert port.echo.started == []


async def test_the_longest_target_and_header_allowed_in_pieces_are_served(port):
    """Each line split mid-way over reads, so the guard counts it across them."""
    reader, writer = await connect(port)
    target = "/" + "t" * 1000  # (the port allows 1024)
    # (a Cookie of the longest length allowed: name and value make 1024, its line 1028)
    head = f"GET {target} HTTP/1.1\r\nCookie: {'c' * 1018}\r\nX-A: 1\r\n\r\n".encode()
    for at in range(0, len(head), 300):
        writer.write(head[at:at + 300])
        await asyncio.sleep(0.05)  # (each its own read)
    status, _, body = await read_answer(reader)
    assert status == 200 and json.loads(body)["target"] == target


async def test_trailers_of_a_chunked_body_are_not_headers_of_the_next_request(port):
    """llhttp reports trailer fields after the head was taken: they were added to the next
    request's headers (an Authorization trailer would have authenticated it)."""
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"3\r\nabc\r\n0\r\nCookie: from-a-trailer\r\n\r\n" + get("/next"))
    first = json.loads((await read_answer(reader))[2])
    second = json.loads((await read_answer(reader))[2])
    assert first["body"] == "abc" and first["cookie"] is None
    assert second["target"] == "/next" and second["cookie"] is None


async def test_an_http10_client_that_asks_to_keep_its_connection_is_told_it_may(port):
    reader, writer = await connect(port)
    for target in ("/a", "/stream"):  # (a stream without a length still ends with the close)
        writer.write(get(target, "Connection: keep-alive\r\n", version="1.0"))
        status, headers, _ = await read_answer(reader)
        assert status == 200
        assert headers["connection"] == ("keep-alive" if target == "/a" else "close")


async def test_a_100_continue_behind_an_earlier_request_follows_its_answer(port):
    reader, writer = await connect(port)
    writer.write(get("/slow?s=0.3") + b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                      b"Expect: 100-continue\r\n\r\n")
    first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert first.startswith(b"HTTP/1.1 200 ")  # the earlier answer first, not a 100
    await reader.readexactly(int(first.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
    # then the 100, at once (the client need not wait out its own expect timeout)
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"ok")
    assert json.loads((await read_answer(reader))[2])["body"] == "ok"


async def test_headers_named_in_connection_are_not_passed_on(port):
    """RFC 9110 7.6.1: they are for this hop; only keep-alive and close were dropped before."""
    reader, writer = await connect(port)
    writer.write(get("/forward", "X-Before: private\r\nConnection: keep-alive, X-Before, x-after"
                                 "\r\nX-After: private\r\nConnection: X-Third\r\n"
                                 "X-Third: private\r\nX-Kept: yes\r\n"))
    forward = json.loads((await read_answer(reader))[2])
    assert "X-Kept: yes" in forward and "private" not in forward
    writer.write(get("/forward", "X-Before: kept\r\n"))  # the next request's own: passed on
    assert "X-Before: kept" in json.loads((await read_answer(reader))[2])


@pytest.mark.parametrize("target", ["/204", "/204-streamed"])
async def test_an_answer_without_a_body_has_no_length_nor_chunks(port, target):
    """RFC 9110: a 204 has no body; a chunked terminator after it was read by strict
    clients as the start of the next answer."""
    reader, writer = await connect(port)
    writer.write(get(target) + get("/a"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 204 ")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    status, _, body = await read_answer(reader)  # the next answer follows at once
    assert status == 200 and json.loads(body)["target"] == "/a"


async def test_bodies_held_at_once_are_bounded_for_the_whole_port(port):
    """Each stalled upload held up to --max-body, and nothing bounded their sum: a few clients
    could take the host's memory. Past `max_held` (4x max_body by default; 130 bytes here,
    for the fixture's 3 connections) a body is refused; what stalled uploads held is given
    back when their clients leave."""
    assert port.max_held == 4 * 64  # (the default)
    port.max_held = 130
    stalled = []
    for _ in range(2):  # 2 x 63 bytes held, of 130
        reader, writer = await connect(port)
        writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 64\r\n\r\n" + b"s" * 63)
        stalled.append(writer)
    await eventually(lambda: port.held == 2 * 63)
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    assert (await read_answer(reader))[0] == 413  # (the test's handler: the proxy says 503)
    for w in stalled:
        w.close()
    await eventually(lambda: port.held == 0)
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789")
    assert json.loads((await read_answer(reader))[2])["body"] == "0123456789"
    assert port.held == 0  # (read whole: nothing left counted)


async def test_garbage_after_a_good_request_is_answered_after_it(port):
    reader, writer = await connect(port)
    writer.write(get("/slow?s=0.1") + b"NOT HTTP AT ALL\r\n\r\n")
    assert (await read_answer(reader))[0] == 200
    assert (await read_answer(reader))[0] == 400


async def test_a_failing_handler_gets_a_500_answer(port):
    reader, writer = await connect(port)
    writer.write(get("/boom"))
    status, headers, body = await read_answer(reader)
    assert status == 500 and json.loads(body)["value"]["message"] == "failed"


async def test_connections_over_the_limit_are_answered_and_closed(port):
    held = [await connect(port) for _ in range(3)]
    for reader, writer in held:  # each one served, so each is counted
        writer.write(get("/a"))
        await read_answer(reader)
    reader, writer = await connect(port)
    status, headers, _ = await read_answer(reader)
    assert status == 429 and headers["connection"] == "close"


def send_all_then_read(port_number: int, data: bytes) -> tuple[int, bytes]:
    """As a blocking client does (urllib3, Selenium's): send the whole request, body and all,
    and only then read; (status, the rest up to the server's close). A reset anywhere fails."""
    import socket
    with socket.create_connection(("127.0.0.1", port_number), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


BIG = 16 << 20  # more than the socket buffers hold: the client still sends when it is answered


async def test_a_body_refused_unread_is_drained_so_the_client_reads_its_answer(port):
    # Answered 413 from its head: closing at once with the body unread makes the kernel reset
    # the connection, and the client, still sending, never reads the 413.
    head = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG
    status, answer = await asyncio.to_thread(send_all_then_read, port.number, head + b"a" * BIG)
    assert status == 413 and answer.endswith(b'{"too": "large"}')


async def test_bytes_after_a_bad_request_are_drained_too(port):
    status, answer = await asyncio.to_thread(send_all_then_read, port.number,
                                             b"FO\x01O / HTTP/1.1\r\n\r\n" + b"z" * BIG)
    assert status == 400


async def test_a_lingering_close_ends_when_the_client_goes_quiet(port, monkeypatch):
    monkeypatch.setattr(front, "_LINGER_QUIET", 0.5)
    reader, writer = await connect(port)
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10)
    status, headers, _ = await read_answer(reader)
    assert status == 413 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""  # our FIN, right after the answer
    assert port.lingering and not port.connections  # reading what the client might send
    # It sends nothing more (nor closes): the connection ends after the quiet time.
    await eventually(lambda: not port.lingering, timeout=3)


async def test_a_lingering_connection_does_not_count_against_the_limit(port):
    held = [await connect(port) for _ in range(2)]
    for reader, writer in held:
        writer.write(get("/a"))
        await read_answer(reader)
    reader, writer = await connect(port)  # the third: refused from its head, then lingering
    writer.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10)
    assert (await read_answer(reader))[0] == 413
    await eventually(lambda: port.lingering)
    reader, writer = await connect(port)  # three served at most: this one is the third
    writer.write(get("/b"))
    assert (await read_answer(reader))[0] == 200


async def test_a_request_over_the_connection_limit_is_drained_before_its_429(port):
    held = [await connect(port) for _ in range(3)]
    for reader, writer in held:
        writer.write(get("/a"))
        await read_answer(reader)
    head = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % BIG
    status, _ = await asyncio.to_thread(send_all_then_read, port.number, head + b"a" * BIG)
    assert status == 429


# --- handlers that answer at once or from a callback (the proxy's command path) -------------

def callback_handler(request: Request):
    """/now answers at once; /later?s=T from a timer (LATER); /stream from a timer that hands
    on to a coroutine (Request.run); /crash from a timer that fails."""
    loop = asyncio.get_running_loop()
    target = request.target

    def answer() -> None:
        request.send(200, [JSON], json.dumps({"target": target}).encode())

    if target == "/now":
        answer()
        return None
    if target.startswith("/later"):
        def later() -> None:
            answer()
            request.finish()
        loop.call_later(float(target.split("=")[1]), later)
        return LATER
    if target == "/stream":
        async def parts():
            yield b"one;"
            yield b"two;"
        loop.call_soon(lambda: request.run(request.stream(200, [JSON], parts())))
        return LATER
    if target == "/crash":
        def crash() -> None:
            try:
                raise RuntimeError("a bug in a callback")
            except RuntimeError:
                request.crashed()
        loop.call_soon(crash)
        return LATER
    return Echo()(request)


@pytest.fixture
async def callback_port():
    server = Port(callback_handler, idle_timeout=5, max_header_size=1024, max_body=64,
                  on_bad_request=bad_request, on_too_many=too_many)
    host, server.number = await server.start("127.0.0.1", 0)
    server.clients = []
    yield server
    for writer in server.clients:
        writer.close()
        await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    await server.close(grace=1)


async def test_answers_given_at_once_or_later_keep_pipelined_requests_in_order(callback_port):
    reader, writer = await connect(callback_port)
    writer.write(get("/later?s=0.2") + get("/now") + get("/later?s=0") + get("/now")
                 + get("/stream") + get("/echo"))
    answers = [await read_answer(reader) for _ in range(6)]
    assert [json.loads(body)["target"] for _, _, body in answers[:4]] == [
        "/later?s=0.2", "/now", "/later?s=0", "/now"]
    assert answers[4][2] == b"one;two;" and answers[4][1]["transfer-encoding"] == "chunked"
    assert json.loads(answers[5][2])["target"] == "/echo"
    writer.write(get("/now", "Connection: close\r\n") + get("/now"))  # the second is not served
    status, headers, _ = await read_answer(reader)
    assert status == 200 and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_callback_that_fails_gets_a_500_answer_and_ends_the_connection(callback_port):
    status, headers, body = await last_answer(callback_port, get("/crash"))
    assert status == 500 and json.loads(body)["value"]["message"] == "failed"


class Transport(asyncio.Transport):
    """A transport with no socket: events are delivered to a Connection by the test itself."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return default

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data) -> None:
        pass

    def close(self) -> None:
        self.closed = True


async def test_a_coroutine_whose_client_left_before_it_started_still_cleans_up():
    """The client's connection is lost before the loop first runs the handler's task (as the
    loop may deliver both in one turn): the coroutine still runs to its first await, so its
    own clean-up (a reserved backend slot, an answer held) runs when it is cancelled there."""
    events: list[str] = []

    async def handler(request: Request) -> None:
        events.append("started")
        try:
            await asyncio.sleep(60)
        finally:
            events.append("cleaned up")

    server = Port(lambda request: handler(request), idle_timeout=5, max_header_size=1024,
                  max_body=64, on_bad_request=bad_request, on_too_many=too_many)
    conn = Connection(server)
    transport = Transport()
    conn.connection_made(transport)
    conn.data_received(get("/a"))  # the handler's task is created, not run yet
    task = conn.task
    transport.closed = True
    conn.connection_lost(None)
    assert conn.task is task and not task.done() and events == []
    await eventually(lambda: task.done())
    assert task.cancelled() and events == ["started", "cleaned up"]


async def test_a_coroutine_handed_a_request_whose_client_already_left_is_cancelled():
    """A callback hands its request on (Request.run) after the client left: a backend answer
    that came late and long. connection_lost cancelled what ran then; this is cancelled too,
    after its first step, so it stops and cleans up instead of serving nobody."""
    events: list[str] = []
    taken: list[Request] = []

    async def step() -> None:
        events.append("started")
        try:
            await asyncio.sleep(60)
        finally:
            events.append("cleaned up")

    def handler(request: Request):
        taken.append(request)
        return LATER

    server = Port(handler, idle_timeout=5, max_header_size=1024, max_body=64,
                  on_bad_request=bad_request, on_too_many=too_many)
    conn = Connection(server)
    transport = Transport()
    conn.connection_made(transport)
    conn.data_received(get("/a"))
    transport.closed = True
    conn.connection_lost(None)
    assert taken[0].gone
    taken[0].run(step())
    task = conn.task
    await eventually(lambda: task.done())
    assert task.cancelled() and events == ["started", "cleaned up"]


# --- bodies and clients that misbehave --------------------------------------------------------

async def _big_port(handler, idle_timeout: float = 5):
    server = Port(handler, idle_timeout=idle_timeout, max_header_size=8192, max_body=64 << 20,
                  on_bad_request=bad_request, on_too_many=too_many)
    host, server.number = await server.start("127.0.0.1", 0)
    return server


async def _answered_body_or_error(request: Request) -> None:
    try:
        body = await request.read()
    except BadRequest as exc:
        request.send(400, [JSON], json.dumps({"bad": str(exc)}).encode(), close=True)
        return
    request.send(200, [JSON], json.dumps({"got": len(body)}).encode())


async def test_a_body_over_a_megabyte_read_whole_arrives():
    """read() wants it all: reading is not paused at the megabyte that chunks() stops at (a
    new session with a browser profile in its capabilities)."""
    server = await _big_port(_answered_body_or_error)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.number)
    size = 3 << 20
    writer.write(b"POST /session HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
                 + b"x" * size)
    try:
        status, _, body = await asyncio.wait_for(read_answer(reader), 10)
        assert status == 200 and json.loads(body) == {"got": size}
    finally:
        writer.close()
        await server.close(grace=0.5)


@pytest.mark.parametrize("rest, why", [
    (b"zz-not-a-chunk-size\r\n\r\n", "chunk size"),  # the chunks turn into garbage
    (None, "stalled"),  # the client stops sending
])
async def test_a_body_that_breaks_off_mid_stream_is_answered_and_ends_the_connection(rest, why):
    server = await _big_port(_answered_body_or_error, idle_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.number)
    writer.write(b"POST /session/abc/url HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                 b"\r\n\r\n5\r\nhello\r\n")
    try:
        await eventually(lambda: any(c.busy for c in server.connections))  # its handler reads
        if rest is not None:
            writer.write(rest)
        status, headers, body = await asyncio.wait_for(read_answer(reader), 5)
        assert status == 400 and why in body.decode() and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
        await server.close(grace=0.5)


async def test_a_client_that_pipelines_and_reads_no_answer_is_not_buffered_without_end():
    """Answers given at once, to requests pipelined by a client that reads none: serving stops
    while writing is paused, and reading stops behind the requests waiting."""
    def handler(request: Request):
        request.send(200, [JSON], b"x" * 1000)  # at once, as /status or an unknown session

    server = await _big_port(handler)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.number)
    try:
        for _ in range(40):  # 40,000 requests, 1.3 MB, never read: 40 MB of answers
            writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        (conn,) = server.connections
        assert conn.transport.get_write_buffer_size() < 1 << 20
        answered = 0
        while answered < 40_000:  # the client reads at last: every answer comes, in order
            status, _, _ = await asyncio.wait_for(read_answer(reader), 10)
            assert status == 200
            answered += 1
    finally:
        writer.transport.abort()
        await server.close(grace=0.5)
