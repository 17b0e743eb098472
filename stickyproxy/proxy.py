"""The WebDriver port (:8910): aiohttp handlers that place new sessions, pin them, and forward
every other command to the one backend that holds its session.

Decisions come from pure modules (webdriver.classify, routing.choose, routing.may_retry_elsewhere);
this module does the I/O. Bodies are parsed only for `POST /session`, where the session id must be
learned; every other request and answer streams through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from . import bridge, routes
from .backends import Backend, Pool
from .guard import Guard
from .lifecycle import Lifecycle, fmt
from .metrics import Metrics, Timing
from .queue import QueueFull, SessionQueue
from .health import DOWN
from .routing import Attempt, may_retry_elsewhere
from .sessions import EndReason, Session, SessionTable
from .upstream import HOP_BY_HOP, NotConnected, Response, UpstreamError
from .webdriver import (Kind, WebDriverError, check_target, classify, session_id_of,
                        with_chrome_args)

log = logging.getLogger("stickyproxy")
access_log = logging.getLogger("stickyproxy.access")

POOL = web.AppKey("pool", Pool)
SESSIONS = web.AppKey("sessions", SessionTable)
TIMEOUT = web.AppKey("backend_timeout", float)
QUEUE = web.AppKey("queue", SessionQueue)
QUEUE_TIMEOUT = web.AppKey("queue_timeout", float)
LIFE = web.AppKey("lifecycle", Lifecycle)
STATE = web.AppKey("state", object)  # .shutting_down
METRICS = web.AppKey("metrics", Metrics)
ACCESS_LOG = web.AppKey("access_log", bool)
TIMING = web.RequestKey("timing", Timing)  # this request's clock: metrics and the access log
GUARD = web.AppKey("guard", Guard)
PRINCIPAL = web.RequestKey("principal", str)  # who sent it, when auth is on
APP = web.RequestKey("app", web.Application)  # the port's state (make_app), set per request
KEY = web.AppKey("session_key", bytes)  # b"": ids are the backends' own

BACKEND_HEADER = "X-Stickyproxy-Backend"
_BUFFER_LIMIT = 1 << 20  # bodies up to this are forwarded whole; larger ones stream
_JSON = "application/json; charset=utf-8"


def error_response(err: WebDriverError, backend: str | None = None) -> web.Response:
    headers = dict(err.headers)
    if backend:
        headers[BACKEND_HEADER] = backend
    response = web.Response(status=err.status, body=err.body(), content_type="application/json",
                            charset="utf-8", headers=headers)
    if err.close:
        response.force_close()
    return response


async def handle(request: web.BaseRequest) -> web.StreamResponse:
    timing = request[TIMING] = Timing(time.perf_counter())
    status = 500  # an exception we did not expect: aiohttp answers 500
    try:
        response = await _route(request, timing)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # the client left before its answer (nginx's "client closed request")
        raise
    finally:
        elapsed = time.perf_counter() - timing.started
        request[APP][METRICS].observe(timing, elapsed)  # the one metrics call per request
        if request[APP][ACCESS_LOG]:
            access_log.info("ACCESS session=%s backend=%s method=%s path=%s status=%d ms=%.1f",
                            timing.session or "-", timing.backend_id or "-", request.method,
                            request.rel_url.raw_path, status, elapsed * 1000)


async def _route(request: web.BaseRequest, timing: Timing) -> web.StreamResponse:
    guard = request[APP][GUARD]
    try:
        try:
            check_target(request.method, request.raw_path)
        except WebDriverError as err:
            raise guard.refuse("bad_request", err, request.remote) from None
        route = classify(request.method, request.rel_url.raw_path)
        if guard.auth.enabled and route.kind is not Kind.STATUS:
            verdict = guard.auth.check(request.headers.get("Authorization"))
            if not verdict.ok:
                raise guard.refuse("auth", guard.unauthenticated(verdict.reason), request.remote)
            request[PRINCIPAL] = verdict.principal
        length = request.content_length
        if length is not None and length > guard.max_body:
            raise guard.refuse("body_too_large", guard.too_large(length), request.remote)
        if route.kind is Kind.SESSION or route.kind is Kind.DELETE_SESSION:
            timing.kind, timing.session = "command", route.session_id
            return await _session_command(request, route.session_id, route.kind, route.rest)
        if route.kind is Kind.NEW_SESSION:
            timing.kind = "new_session"
            return await _new_session(request)
        if route.kind is Kind.STATUS:
            return _status(request[APP][POOL])
        raise WebDriverError.unknown_command(request.method, request.rel_url.raw_path)
    except WebDriverError as err:
        return error_response(err)


def _status(pool: Pool) -> web.Response:
    up = sum(1 for b in pool if b.health.up)
    ready = up > 0
    message = f"{up} of {len(pool.backends)} backends up" if ready else "no backend is up"
    return web.json_response({"value": {"ready": ready, "message": message}})


async def _body(request: web.BaseRequest) -> tuple[bytes | AsyncIterator[bytes] | None, int | None]:
    """The request body whole when small or absent, else a stream (with its length if known)."""
    length = request.content_length
    if not request.body_exists:
        return None, 0
    if length is not None and length <= _BUFFER_LIMIT:
        return await request.read(), length
    return _limited(request), length


async def _limited(request: web.BaseRequest) -> AsyncIterator[bytes]:
    """A streamed body, cut off at --max-body (a chunked upload declares no length up front)."""
    guard, seen = request[APP][GUARD], 0
    async for chunk in request.content.iter_any():
        seen += len(chunk)
        if seen > guard.max_body:
            raise guard.refuse("body_too_large", guard.too_large(None), request.remote)
        yield chunk


async def _session_command(request: web.BaseRequest, sid: str, kind: Kind,
                           rest: str) -> web.StreamResponse:
    sessions = request[APP][SESSIONS]
    session = sessions.get(sid)
    if session is not None and session.owner != request.get(PRINCIPAL, ""):
        # Someone else's: indistinguishable from no session at all.
        raise WebDriverError.invalid_session(sid, "no such session on this proxy")
    if session is None and request[APP][KEY]:
        session = _learn(request, sid)
    if session is None:
        ended = sessions.why_ended(sid)
        if ended is None:
            raise WebDriverError.invalid_session(sid, "no such session on this proxy")
        raise WebDriverError.invalid_session(
            sid, f"ended on backend {ended.backend_id}: {ended.reason.value}"
                 + (f" ({ended.detail})" if ended.detail else ""))
    pool = request[APP][POOL]
    request[TIMING].backend_id = session.backend_id
    backend = pool.get(session.backend_id)
    if backend is None or backend.health.state == DOWN:
        why = (backend.last_check.reason if backend and backend.last_check else "removed")
        raise WebDriverError.backend_unavailable(sid, session.backend_id, f"down: {why}")
    session.last_used = time.monotonic()
    session.requests += 1
    if session.bridge is not None:
        return await _bridged_command(request, session, backend, rest, kind)
    backend.requests_total += 1
    body, length = await _body(request)
    target = request.rel_url.raw_path_qs
    if session.rewritten:  # the backend knows its session by its own id, in paths and bodies
        target = target.replace(sid, session.backend_sid, 1)
        body, length = _rewrite(body, length, sid.encode(), session.backend_sid.encode())
    timing = request[TIMING]
    began = time.perf_counter()  # inline, not timing.on_backend: one coroutine less per command
    try:
        answer = await backend.upstream.request(
            request.method, target, request.raw_headers, body,
            length=length, timeout=request[APP][TIMEOUT])
    except (NotConnected, UpstreamError, TimeoutError) as exc:
        timing.backend += time.perf_counter() - began
        backend.errors_total += 1
        why = str(exc) or f"no answer within {request[APP][TIMEOUT]:g}s"
        log.warning('PROXY_ERROR session=%s backend=%s reason="%s"', sid, backend.id, why)
        if kind is Kind.DELETE_SESSION:
            sessions.end(sid, EndReason.CLIENT_DELETE, f"delete not confirmed: {why}")
        raise WebDriverError.backend_unavailable(sid, backend.id, why) from None
    timing.backend += time.perf_counter() - began
    if kind is Kind.DELETE_SESSION:
        # Forwarded and answered: whatever the backend said, the client is done with it.
        sessions.end(sid, EndReason.CLIENT_DELETE)
    return await _relay(request, answer, backend, sid,
                        session.backend_sid if session.rewritten else None)


def _learn(request: web.BaseRequest, public: str) -> Session | None:
    """A session created through another replica (or before a restart): routed by the route
    signed into its id, then pinned here like our own."""
    owner = request.get(PRINCIPAL, "")
    parsed = routes.parse(request[APP][KEY], public, owner)
    pool = request[APP][POOL]
    backend_id = pool.by_route.get(parsed.route) if parsed else None
    if backend_id is None:
        return None
    now = time.monotonic()
    session = Session(public, backend_id, pool.backends[backend_id].spec.generation, now, now,
                      owner=owner, backend_sid=parsed.backend_sid, learned=True,
                      bridge=bridge.BridgeSession() if parsed.bridged else None)
    request[APP][SESSIONS].pin(session)
    return session


def _rewrite(body, length: int | None, old: bytes, new: bytes):
    if body is None:
        return None, 0
    if isinstance(body, (bytes, bytearray)):
        body = bytes(body).replace(old, new)
        return body, len(body)
    return _rewrite_stream(body, routes.Rewriter(old, new)), None  # length changes: chunked


async def _rewrite_stream(chunks: AsyncIterator[bytes], rewriter) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield rewriter.feed(chunk)
    yield rewriter.close()


async def _relay(request: web.BaseRequest, answer: Response, backend: Backend,
                 sid: str, backend_sid: str | None = None) -> web.StreamResponse:
    """Send a backend's answer on to the client: whole when small, streamed when large; with
    the backend's session id turned back into the client's where they differ."""
    try:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer.headers
                   if k.lower() not in HOP_BY_HOP]
        headers.append((BACKEND_HEADER, backend.id))
        length = answer.header(b"content-length")
        if length is not None and int(length) <= _BUFFER_LIMIT:
            began = time.perf_counter()
            body = await answer.read()
            request[TIMING].backend += time.perf_counter() - began
            if backend_sid:
                body = body.replace(backend_sid.encode(), sid.encode())
            return web.Response(status=answer.status, body=body, headers=headers)
        response = web.StreamResponse(status=answer.status, headers=headers)
        rewriter = routes.Rewriter(backend_sid.encode(), sid.encode()) if backend_sid else None
        if length is not None and rewriter is None:
            response.content_length = int(length)
        await response.prepare(request)
        began = time.perf_counter()
        async for chunk in answer.chunks():
            await response.write(rewriter.feed(chunk) if rewriter else chunk)
        if rewriter:
            await response.write(rewriter.close())
        await response.write_eof()
        request[TIMING].backend += time.perf_counter() - began  # streamed at the backend's pace
        return response
    except (UpstreamError, TimeoutError) as exc:
        backend.errors_total += 1
        log.warning('PROXY_ERROR session=%s backend=%s reason="%s"', sid, backend.id, exc)
        raise WebDriverError.unknown(f"backend {backend.id} failed mid-answer: {exc}") from None
    finally:
        answer.release()


async def _new_session(request: web.BaseRequest) -> web.StreamResponse:
    pool, sessions, queue, state = (request[APP][POOL], request[APP][SESSIONS], request[APP][QUEUE],
                                    request[APP][STATE])
    if state.shutting_down:
        raise WebDriverError.session_not_created("stickyproxy is shutting down")
    guard = request[APP][GUARD]
    wait = guard.limiter.take(request.remote or "-", time.monotonic())
    if wait:
        raise guard.refuse("rate", guard.too_fast(wait), request.remote)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise guard.refuse("body_too_large", guard.too_large(None), request.remote) from None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebDriverError.invalid_argument(f"new session body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise WebDriverError.invalid_argument("new session body must be a JSON object")
    cookie = request.headers.get("Cookie")
    if bridge.client_dialect(payload) == "w3c":
        # Sent with desiredCapabilities too, as Selenium 3 clients did: GhostDriver reads those,
        # a W3C backend ignores them, and the answer's shape tells which one we reached.
        body = json.dumps(bridge.new_session_request(payload)).encode()
        w3c_client = True
    else:
        w3c_client = False
    tried: tuple[str, ...] = ()
    backend_id = queue.admit(cookie)
    while True:
        if backend_id is None:
            backend_id = await _wait_for_slot(request, cookie, tried)
        current, backend = backend_id, pool.backends.get(backend_id)
        request[TIMING].backend_id = backend_id
        try:
            if backend is None:  # removed while we waited
                raise NotConnected("backend was removed")
            # Shielded: if the client leaves mid-attempt, a session the backend may create is
            # still learned, and deleted, instead of left running with nobody to quit it.
            chrome_args = backend.spec.meta.get("chrome_args") if w3c_client else None
            sent = (json.dumps(bridge.new_session_request(with_chrome_args(payload, chrome_args)))
                    .encode() if chrome_args else body)
            attempt = asyncio.ensure_future(_attempt(request, backend, sent, w3c_client))
            try:
                answer, data = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                owner = request.get(PRINCIPAL, "")
                attempt.add_done_callback(lambda t, b=backend: _orphaned(request[APP], b, t, owner))
                raise
            try:  # pinned before the reservation is released, so the slot is never handed twice
                return await _pin_new_session(request, sessions, backend, answer, data, cookie,
                                              payload if w3c_client else None)
            finally:
                answer.release()
        except (NotConnected, UpstreamError, TimeoutError) as exc:
            why = str(exc) or "no answer in time"
            if backend is not None:
                backend.errors_total += 1
            stage = Attempt.NOT_CONNECTED if isinstance(exc, NotConnected) else Attempt.SENT
            if may_retry_elsewhere(stage):
                log.warning('SESSION_RETRY backend=%s reason="%s"', backend_id, why)
                tried += (backend_id,)
                backend_id = pool.pick(cookie, tried)
                continue
            log.warning('SESSION_NOT_CREATED backend=%s reason="%s"', backend_id, why)
            raise WebDriverError.session_not_created(
                f"backend {backend_id} failed after the request was sent ({why}); "
                "not retried elsewhere, so no second session is started") from None
        finally:
            pool.release(current)  # the reservation made by pick() or the queue


async def _wait_for_slot(request: web.BaseRequest, cookie: str | None, tried: tuple[str, ...]) -> str:
    """Queue for a slot when backends are up but full; fail at once when none could take it."""
    pool, queue = request[APP][POOL], request[APP][QUEUE]
    if not pool.could_take(tried):
        raise WebDriverError.session_not_created(_no_backend_message(pool, tried))
    timeout = request[APP][QUEUE_TIMEOUT]
    began, refused = time.perf_counter(), False
    try:
        return await queue.wait(cookie, tried, timeout)
    except QueueFull:
        refused = True  # refused at once: it never waited
        log.warning("SESSION_NOT_CREATED reason=queue_full length=%d", len(queue))
        raise WebDriverError.session_not_created(
            f"every backend is full and {len(queue)} new sessions are already waiting "
            f"(--max-queue {queue.max_length})", retry_after=max(1, round(timeout / 4))) from None
    except TimeoutError:
        log.warning("SESSION_NOT_CREATED reason=queue_timeout waited=%s", fmt(timeout))
        raise WebDriverError.session_not_created(
            f"every backend stayed full for {fmt(timeout)} (--queue-timeout); "
            f"{len(pool.backends)} backends, --max-sessions {pool.max_sessions}") from None
    finally:
        if not refused:
            waited = time.perf_counter() - began
            request[TIMING].queued += waited
            request[APP][METRICS].observe_queue_wait(waited)


async def _attempt(request: web.BaseRequest, backend: Backend, body: bytes,
                   rewritten: bool) -> tuple[Response, bytes]:
    headers = request.raw_headers
    if rewritten:  # the body changed: its length is recomputed, its type stays JSON
        headers = [h for h in headers if h[0].lower() != b"content-type"]
        headers.append((b"Content-Type", b"application/json; charset=utf-8"))
    answer = await request[TIMING].on_backend(backend.upstream.request(
        "POST", request.rel_url.raw_path_qs, headers, body,
        timeout=request[APP][TIMEOUT], fresh=True))
    try:
        return answer, await request[TIMING].on_backend(answer.read())
    except BaseException:
        answer.release()
        raise


def _orphaned(app: web.Application, backend: Backend, attempt: asyncio.Future,
              owner: str) -> None:
    """The client left while its new session was being created: pin it, then end it at once
    (deleted on the backend), so it is counted and logged instead of leaking."""
    if attempt.cancelled() or attempt.exception() is not None:
        return
    answer, data = attempt.result()
    answer.release()
    try:
        sid = session_id_of(json.loads(data)) if 200 <= answer.status < 300 else None
    except ValueError:
        sid = None
    if sid:
        now = time.monotonic()
        app[SESSIONS].pin(Session(sid, backend.id, backend.spec.generation, now, now, owner=owner))
        app[LIFE].end(sid, EndReason.CLIENT_DELETE, "client left before the new session answer")


async def _pin_new_session(request: web.BaseRequest, sessions: SessionTable, backend: Backend,
                           answer: Response, data: bytes, cookie: str | None,
                           w3c_payload: dict | None) -> web.Response:
    """Learn the session id from a backend's new-session answer and pin it. For a W3C client
    (`w3c_payload` given) whose backend answered JSONWP, the session is bridged."""
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in answer.headers
               if k.lower() not in HOP_BY_HOP]
    headers.append((BACKEND_HEADER, backend.id))
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    bridged = None
    if w3c_payload is not None and bridge.response_dialect(parsed) != "w3c" and (
            bridge.response_dialect(parsed) == "jsonwp" or backend.dialect == "jsonwp"):
        status, parsed, sid = bridge.new_session_response(answer.status, parsed, w3c_payload)
        if sid is None:
            log.warning('SESSION_NOT_CREATED backend=%s status=%d reason="%s"', backend.id,
                        answer.status, parsed["value"]["message"])
            return _json(status, parsed, backend)
        bridged = bridge.BridgeSession.from_request(w3c_payload)
    elif not 200 <= answer.status < 300:
        log.warning("SESSION_NOT_CREATED backend=%s status=%d", backend.id, answer.status)
        return web.Response(status=answer.status, body=data, headers=headers)
    else:
        sid = session_id_of(parsed)
    if sid is None:
        backend.errors_total += 1
        log.warning('SESSION_NOT_CREATED backend=%s reason="answer has no session id"', backend.id)
        raise WebDriverError.session_not_created(
            f"backend {backend.id} answered the new session without a session id")
    now = time.monotonic()
    owner = request.get(PRINCIPAL, "")
    public = sid
    if request[APP][KEY]:  # the client's id carries its signed route (routes.py)
        public = routes.public_id(request[APP][KEY], backend.spec.url, sid, owner, bridged is not None)
        data = data.replace(sid.encode(), public.encode())
        if bridged is not None:
            parsed = json.loads(json.dumps(parsed).replace(sid, public))
    request[TIMING].session = public
    sessions.pin(Session(public, backend.id, backend.spec.generation, now, now, cookie or "",
                         bridge=bridged, owner=owner, backend_sid=sid))
    backend.sessions_total += 1
    backend.generation_sessions += 1
    backend.requests_total += 1
    request[APP][LIFE].consider(backend, now)
    if bridged is None:
        backend.dialect = "jsonwp" if isinstance(parsed, dict) and isinstance(
            parsed.get("status"), int) else "w3c"
        return web.Response(status=answer.status, body=data, headers=headers)
    backend.dialect = "jsonwp"
    setup = bridged.setup()  # timeouts the client asked for in its capabilities
    if setup is not None:
        reply = await bridge.run(setup, _sender(request, backend, sid))  # the backend's id
        if reply.status != 200:
            return _json(reply.status, reply.body, backend)
    return _json(status, parsed, backend)


def _json(status: int, body, backend: Backend) -> web.Response:
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type="application/json", charset="utf-8",
                        headers={BACKEND_HEADER: backend.id})


def _sender(request: web.BaseRequest, backend: Backend, sid: str):
    """The bridge's `send`: one JSONWP call on the session's backend, parsed."""
    app, timing = request[APP], request[TIMING]

    async def send(method: str, subpath: str, body) -> tuple[int, object]:
        payload = None if body is None else json.dumps(body).encode()
        headers = [(b"Content-Type", b"application/json; charset=utf-8")] if payload else []
        backend.requests_total += 1
        answer = await timing.on_backend(backend.upstream.request(
            method, f"/session/{sid}{subpath}", headers, payload, timeout=app[TIMEOUT]))
        try:
            raw = await timing.on_backend(answer.read())
        finally:
            answer.release()
        try:
            return answer.status, json.loads(raw)
        except ValueError:
            return answer.status, raw.decode("utf-8", "replace")
    return send


async def _bridged_command(request: web.BaseRequest, session: Session, backend: Backend,
                           rest: str, kind: Kind) -> web.Response:
    """A W3C command of a session on a JSONWP backend: planned and answered by the bridge."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebDriverError.invalid_argument(f"body is not JSON: {exc}") from None
    step = session.bridge.plan(request.method, rest, body)
    try:
        reply = await bridge.run(step, _sender(request, backend, session.backend_sid))
    except (NotConnected, UpstreamError, TimeoutError) as exc:
        backend.errors_total += 1
        why = str(exc) or f"no answer within {request[APP][TIMEOUT]:g}s"
        log.warning('PROXY_ERROR session=%s backend=%s reason="%s"', session.id, backend.id, why)
        if kind is Kind.DELETE_SESSION:
            request[APP][SESSIONS].end(session.id, EndReason.CLIENT_DELETE,
                                      f"delete not confirmed: {why}")
        raise WebDriverError.backend_unavailable(session.id, backend.id, why) from None
    if kind is Kind.DELETE_SESSION:
        request[APP][SESSIONS].end(session.id, EndReason.CLIENT_DELETE)
    return _json(reply.status, reply.body, backend)


def _no_backend_message(pool: Pool, tried: list[str]) -> str:
    if not pool.backends:
        return "no backends are configured"
    states = ", ".join(
        f"{b.id} {'refused the connection' if b.id in tried else b.health.state}"
        + (f" ({b.last_check.reason})" if b.last_check and b.id not in tried and not b.health.up else "")
        + (f" [{b.admin}]" if b.admin != "ready" else "")
        for b in pool)
    return f"no backend can take a new session: {states}"


def make_app(pool: Pool, sessions: SessionTable, queue: SessionQueue, life: Lifecycle, state,
             guard: Guard, backend_timeout: float, queue_timeout: float,
             session_key: bytes = b"", *,
             metrics: Metrics | None = None, access_log: bool = False) -> web.Application:
    """The WebDriver port's shared state, under typed keys (served by `make_server`)."""
    app = web.Application()
    app[METRICS] = metrics or Metrics(dict, process=False)
    app[ACCESS_LOG] = access_log
    app[GUARD] = guard
    app[POOL] = pool
    app[SESSIONS] = sessions
    app[QUEUE] = queue
    app[LIFE] = life
    app[STATE] = state
    app[TIMEOUT] = backend_timeout
    app[QUEUE_TIMEOUT] = queue_timeout
    app[KEY] = session_key
    return app


def make_server(app: web.Application, *, keepalive_timeout: float,
                max_header_size: int) -> web.Server:
    """aiohttp's low-level server with `handle` for every request, whatever its target: no
    router (it would answer `CONNECT host:443` with its own text/plain 404, and resolving a
    catch-all route, building a not-found exception and wrapping a middleware cost about a
    tenth of the proxy's CPU per request), no middlewares."""
    loop = asyncio.get_running_loop()
    guard = app[GUARD]

    def request_factory(message, payload, protocol, writer, task) -> web.BaseRequest:
        request = web.BaseRequest(message, payload, protocol, writer, task, loop,
                                  client_max_size=guard.max_body)
        request[APP] = app
        return request

    # handler_cancellation: a client that disconnects while queued leaves the queue at once
    server = web.Server(handle, request_factory=request_factory, handler_cancellation=True,
                        access_log=None, keepalive_timeout=keepalive_timeout,
                        max_line_size=max_header_size, max_field_size=max_header_size)
    answer_parse_errors_as_webdriver(server, guard)
    return server


class _WebDriverErrors(RequestHandler):
    """aiohttp answers requests it cannot parse (header too long, bad request line, ...) before
    any handler runs, as text/plain; WebDriver clients get the W3C JSON error instead. It also
    turns away connections beyond --max-connections before reading anything from them."""

    guard: Guard

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        limit = self.guard.max_connections
        if limit and len(self._manager.connections) > limit:
            err = self.guard.refuse("connections", WebDriverError(
                429, "unknown error", f"too many connections to stickyproxy (--max-connections "
                                      f"{limit}); retry shortly", {"Retry-After": "1"}),
                (transport.get_extra_info("peername") or ("-",))[0])
            body = err.body()
            transport.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json; "
                            b"charset=utf-8\r\nRetry-After: 1\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
            transport.close()

    def handle_error(self, request, status=500, exc=None, message=None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if already sent
        status = min(status, 500)  # never above 500: Selenium 3 reads that as success
        if status < 500:
            err = WebDriverError(status, "invalid argument",
                                 f"bad HTTP request: {message or exc or 'unreadable'}")
        else:
            err = WebDriverError.unknown(f"stickyproxy failed on this request: {exc!r}")
        if status < 500:
            self.guard.refuse("bad_request", err, request.remote)
        response = error_response(err)
        response.force_close()
        return response


def answer_parse_errors_as_webdriver(server: web.Server, guard: Guard) -> None:
    """Make `server` (the WebDriver port's) build its connections with `_WebDriverErrors`."""
    handler_class = type("WebDriverErrors", (_WebDriverErrors,), {"guard": guard})
    make = server._kwargs  # the handler arguments aiohttp keeps for each new connection

    class _Server(type(server)):
        def __call__(self):
            return handler_class(self, loop=self._loop, **make)

    server.__class__ = _Server
