"""The WebDriver port (:8910): the handler that places new sessions, pins them, and forwards
every other command to the one backend that holds its session (served by front.py).

Decisions come from pure modules (webdriver.route, routing.choose, routing.may_retry_elsewhere);
this module does the I/O. Bodies are parsed only for `POST /session`, where the session id must be
learned; every other request and answer streams through untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from functools import partial
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable

from . import bridge, routes, webdriver
from .backends import Backend, Pool
from .front import LATER, BadRequest, BodyTooLarge, ClientGone, Header, Port, Request, UploadsFull
from .guard import Guard
from .lifecycle import Lifecycle, fmt
from .metrics import Metrics, Timing
from .outbox import Outbox
from .queue import QueueFull, SessionQueue
from .health import DOWN
from .routing import Attempt, may_retry_elsewhere
from .sessions import EndReason, Session, SessionTable
from .upstream import HOP_BY_HOP, WHOLE, NotConnected, Response, UpstreamError, without_headers
from .webdriver import Kind, WebDriverError, session_id_of, with_chrome_args

log = logging.getLogger("stickyproxy")
access_log = logging.getLogger("stickyproxy.access")

BACKEND_HEADER = "X-Stickyproxy-Backend"
_BACKEND_HEADER = BACKEND_HEADER.encode()
_JSON_TYPE = (b"Content-Type", b"application/json; charset=utf-8")
_JSON_LINE = b"Content-Type: application/json; charset=utf-8\r\n"


@dataclass(eq=False)
class App:
    """The WebDriver port's shared state, reached from each request as `request.app`."""
    pool: Pool
    sessions: SessionTable
    queue: SessionQueue
    life: Lifecycle
    state: object  # .shutting_down
    guard: Guard
    timeout: float  # --backend-timeout
    queue_timeout: float
    key: bytes = b""  # --session-key; b"": ids are the backends' own
    metrics: Metrics = field(default_factory=lambda: Metrics(dict, process=False))
    access_log: bool = False


class Reply:
    """A whole answer, written by `handle` in one go (`body` None: already streamed)."""

    __slots__ = ("status", "headers", "body", "close")

    def __init__(self, status: int, headers: list[Header] | bytes, body: bytes | None,
                 close: bool = False) -> None:
        self.status, self.headers, self.body, self.close = status, headers, body, close


def error_response(err: WebDriverError, backend: str | None = None) -> Reply:
    headers = [_JSON_TYPE] + [(k.encode("latin-1"), v.encode("latin-1"))
                              for k, v in err.headers.items()]
    if backend:
        headers.append((_BACKEND_HEADER, backend.encode()))
    return Reply(err.status, headers, err.body(), err.close)


def handle(request: Request):
    """front.py's handler: None when answered at once, LATER when a callback will answer (a
    command forwarded to its backend), else the coroutine that answers."""
    app = request.app
    timing = request.timing = Timing(time.perf_counter())
    try:
        step = _route(request, app, timing)
    except WebDriverError as err:
        step = error_response(err)
    except Exception:
        _observe(request, 500)  # a bug of ours: front.py answers 500
        raise
    if step is LATER:
        return LATER
    if type(step) is Reply:
        _answer(request, step)
        return None
    return _answer_when_done(request, step)


def _answer(request: Request, reply: Reply) -> None:
    """Send a reply, and account for the request (the one metrics call per request)."""
    if reply.body is not None and not request.sent:
        request.send(reply.status, reply.headers, reply.body, close=reply.close)
    _observe(request, reply.status)


def _observe(request: Request, status: int) -> None:
    """The end of a request, once whatever way it ends: counted, and its session no longer busy."""
    app, timing = request.app, request.timing
    session = timing.busy
    if session is not None:
        timing.busy = None
        session.busy -= 1
        session.last_used = time.monotonic()  # idle from its last answer
    elapsed = time.perf_counter() - timing.started
    app.metrics.observe(timing, elapsed)
    if app.access_log:
        access_log.info("ACCESS session=%s backend=%s method=%s path=%s status=%d ms=%.1f",
                        timing.session or "-", timing.backend_id or "-", request.method,
                        request.path, status, elapsed * 1000)


async def _answer_when_done(request: Request, step: Awaitable[Reply]) -> None:
    try:
        reply = await step
    except WebDriverError as err:
        reply = error_response(err)
    except ClientGone:  # it left mid-body: nothing to answer, and no bug of ours
        _observe(request, 499)
        return
    except BadRequest as exc:  # its body broke off or stalled: answered, then the connection ends
        reply = error_response(request.app.guard.refuse(
            "bad_request", WebDriverError.invalid_argument(f"bad HTTP request: {exc}"),
            request.remote))
    except asyncio.CancelledError:
        _observe(request, 499)  # the client left before its answer (nginx's "client closed request")
        raise
    except BaseException:
        _observe(request, 500)  # a bug of ours: front.py answers 500
        raise
    _answer(request, reply)


def _reply_now(request: Request, step: Reply | Awaitable[Reply]) -> bool:
    """A callback's outcome: a Reply is answered here (True: the callback finishes the
    request), a coroutine goes on in the request's task (False: it finishes it)."""
    if type(step) is Reply:
        _answer(request, step)
        return True
    request.run(_answer_when_done(request, step))
    return False


def _callback_failed(request: Request, answer: Response | None) -> None:
    """A bug of ours in a backend answer's callback: the answer released (a released one
    ignores it), the request counted, and front.py's 500 sent."""
    if answer is not None:
        answer.release()
    _observe(request, 500)
    request.crashed()


def _route(request: Request, app: App, timing: Timing) -> Reply | Awaitable[Reply] | object:
    """The checks every request passes, then its handler: a Reply, LATER (a command sent on,
    answered by `_command_answered`), or the coroutine that will make a Reply. Refusals and
    WebDriver errors are raised, and `handle` answers them."""
    guard = app.guard
    try:
        route = webdriver.route(request.method, request.target)
    except WebDriverError as err:
        if err.error == "invalid session id":  # an answer (no such session), not a refusal
            raise
        raise guard.refuse("bad_request", err, request.remote) from None
    if guard.auth.enabled and route.kind is not Kind.STATUS:
        verdict = guard.auth.check(request.headers.get("authorization"))
        if not verdict.ok:
            raise guard.refuse("auth", guard.auth_busy() if verdict.busy
                               else guard.unauthenticated(verdict.reason), request.remote)
        request.principal = verdict.principal
    length = request.content_length
    if length is not None and length > guard.max_body:
        raise guard.refuse("body_too_large", guard.too_large(length), request.remote)
    if route.kind is Kind.SESSION or route.kind is Kind.DELETE_SESSION:
        timing.kind, timing.session = "command", route.session_id
        return _session_command(request, app, route.session_id, route.kind, route.rest)
    if route.kind is Kind.NEW_SESSION:
        timing.kind = "new_session"
        return _new_session_now(request, app)
    if route.kind is Kind.STATUS:
        return _status(app.pool)
    raise WebDriverError.unknown_command(request.method, request.path)


def _status(pool: Pool) -> Reply:
    up = sum(1 for b in pool if b.health.up)
    ready = up > 0
    message = f"{up} of {len(pool.backends)} backends up" if ready else "no backend is up"
    return Reply(200, [_JSON_TYPE], json.dumps({"value": {"ready": ready, "message": message}})
                 .encode())


async def _body(request: Request, guard: Guard) -> bytes | None:
    """The request body, whole (--max-body bounds it), before a backend connection is taken:
    a client that uploads slowly holds none, a chunked upload goes on with a length
    (GhostDriver answers a chunked body 404), and a session id in it is one replace away."""
    if not request.body_exists:
        return None
    try:
        return await request.read()
    except BodyTooLarge as exc:  # (a declared length over the limit was refused before)
        raise _refused_body(guard, exc, request) from None


def _refused_body(guard: Guard, exc: BodyTooLarge, request: Request) -> WebDriverError:
    return guard.refuse("body_too_large", guard.uploads_full() if isinstance(exc, UploadsFull)
                        else guard.too_large(None), request.remote)


def _session_command(request: Request, app: App, sid: str, kind: Kind,
                     rest: str) -> Awaitable[Reply] | object:
    sessions = app.sessions
    session = sessions.get(sid)
    if session is not None and session.owner != request.principal:
        # Someone else's: indistinguishable from no session at all.
        raise WebDriverError.invalid_session(sid, "no such session on this proxy")
    if session is None and app.key and sessions.why_ended(sid) is None:
        session = _learn(request, app, sid)  # (never a session of ours that has ended)
    if session is None:
        ended = sessions.why_ended(sid)
        if ended is None:
            raise WebDriverError.invalid_session(sid, "no such session on this proxy")
        raise WebDriverError.invalid_session(
            sid, f"ended on backend {ended.backend_id}: {ended.reason.value}"
                 + (f" ({ended.detail})" if ended.detail else ""))
    timing = request.timing
    timing.backend_id = session.backend_id
    backend = session.backend
    if backend is None or not backend.serving:  # its first command, or its backend is not up
        backend = session.backend = app.pool.backends.get(session.backend_id)
        if backend is None or backend.health.state == DOWN:
            why = (backend.last_check.reason if backend and backend.last_check else "removed")
            raise WebDriverError.backend_unavailable(sid, session.backend_id, f"down: {why}")
    session.last_used = time.monotonic()
    session.requests += 1
    session.busy += 1  # until _observe: the idle reaper leaves it alone meanwhile
    timing.busy = session
    if session.bridge is not None:
        return _bridged_command_now(request, app, session, backend, rest, kind)
    backend.requests_total += 1
    if session.backend_sid == sid:  # the usual command: sent on as it came, answered by callback
        body = request.body
        if body is None or (body := body.whole()) is not None:
            # (a partial, not a closure: one Python frame less on every answer)
            answered = partial(_command_answered, request, app, sid, kind, backend,
                               time.perf_counter())  # when the backend's time starts
            backend.upstream.submit(request.method, request.target, request.forward, body,
                                    app.timeout, answered)
            return LATER
    return _forward(request, app, session, backend, sid, kind)


def _command_answered(request: Request, app: App, sid: str, kind: Kind, backend: Backend,
                      began: float, answer: Response | None, exc: BaseException | None) -> None:
    """A command's answer (or failure) from its backend, passed on to the client."""
    try:
        request.timing.backend += time.perf_counter() - began
        if exc is not None:
            _answer(request, error_response(_command_failed(app, sid, kind, backend, exc)))
        else:
            if kind is Kind.DELETE_SESSION:
                app.sessions.end(sid, EndReason.CLIENT_DELETE)
            length = answer.length
            body = answer.ready_body() if length is not None and length <= WHOLE else None
            if body is None:  # long, streamed or unfinished: a coroutine relays it
                request.run(_answer_when_done(request, _relay(request, answer, backend, sid)))
                return
            answer.release()  # the usual answer: all here, passed on as it is
            request.send(answer.status, answer.forward + backend.served_by, body)
            _observe(request, answer.status)
    except Exception:
        _callback_failed(request, answer)
        return
    request.finish()


def _command_failed(app: App, sid: str, kind: Kind, backend: Backend,
                    exc: BaseException) -> WebDriverError:
    """A command its backend did not answer: counted, logged, and the client's error."""
    app.pool.count_error(backend)
    why = str(exc) or f"no answer within {app.timeout:g}s"
    log.warning('PROXY_ERROR session=%s backend=%s reason="%s"', sid, backend.id, why)
    if kind is Kind.DELETE_SESSION:
        app.sessions.end(sid, EndReason.CLIENT_DELETE, f"delete not confirmed: {why}")
    return WebDriverError.backend_unavailable(sid, backend.id, why)


async def _forward(request: Request, app: App, session: Session, backend: Backend, sid: str,
                   kind: Kind) -> Reply:
    """A command with a body to stream, or whose session id the backend knows by another."""
    timing = request.timing
    body = None if request.body is None else await _body(request, app.guard)
    target = request.target
    rewritten = session.backend_sid != sid
    if rewritten:  # the backend knows its session by its own id, in paths and bodies
        target = target.replace(sid, session.backend_sid, 1)
        if body:
            body = body.replace(sid.encode(), session.backend_sid.encode())
    began = time.perf_counter()
    try:
        answer = await backend.upstream.request(
            request.method, target, request.forward, body, timeout=app.timeout)
    except (NotConnected, UpstreamError, TimeoutError) as exc:
        timing.backend += time.perf_counter() - began
        raise _command_failed(app, sid, kind, backend, exc) from None
    timing.backend += time.perf_counter() - began
    if kind is Kind.DELETE_SESSION:
        # Forwarded and answered: whatever the backend said, the client is done with it.
        app.sessions.end(sid, EndReason.CLIENT_DELETE)
    return await _relay(request, answer, backend, sid, session.backend_sid if rewritten else None)


def _learn(request: Request, app: App, public: str) -> Session | None:
    """A session created through another replica (or before a restart): routed by the route
    signed into its id, then pinned here like our own."""
    owner = request.principal
    parsed = routes.parse(app.key, public, owner)
    backend_id = app.pool.by_route.get(parsed.route) if parsed else None
    if backend_id is None:
        return None
    if app.sessions.holder(backend_id, parsed.backend_sid) is not None:
        # Its backend's id is a live session's here under another client id: the backend gave
        # one id to two sessions (it lost one and reuses ids). Which one lives there cannot be
        # told from the ids, so the one already pinned keeps it and the ids never share a
        # browser here. (Across replicas, the stale one may be the pin: it holds until it
        # idles out or its backend is seen down.)
        raise WebDriverError.invalid_session(
            public, f"another live session here has this session's id on backend {backend_id}")
    now = time.monotonic()
    session = Session(public, backend_id, app.pool.backends[backend_id].spec.generation, now, now,
                      owner=owner, backend_sid=parsed.backend_sid, learned=True,
                      bridge=bridge.BridgeSession() if parsed.bridged else None)
    app.sessions.pin(session)
    return session


async def _rewrite_stream(chunks: AsyncIterator[bytes], rewriter) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield rewriter.feed(chunk)
    yield rewriter.close()


def _answer_headers(answer: Response, backend: Backend) -> bytes:
    return answer.forward + backend.served_by


async def _relay(request: Request, answer: Response, backend: Backend,
                 sid: str, backend_sid: str | None = None) -> Reply:
    """Send a backend's answer on to the client: whole when small, streamed when large; with
    the backend's session id turned back into the client's where they differ."""
    timing = request.timing
    try:
        headers = _answer_headers(answer, backend)
        length = answer.length
        if length is not None and length <= WHOLE:
            body = answer.ready_body()  # all here: the head was awaited with it
            if body is None:
                began = time.perf_counter()
                body = await answer.read(request.app.timeout)
                timing.backend += time.perf_counter() - began
            if backend_sid:
                body = body.replace(backend_sid.encode(), sid.encode())
            return Reply(answer.status, headers, body)
        rewriter = routes.Rewriter(backend_sid.encode(), sid.encode()) if backend_sid else None
        began = time.perf_counter()
        chunks = answer.chunks(request.app.timeout)  # (each within it: a stall ends the answer)
        await request.stream(answer.status, headers, _rewrite_stream(chunks, rewriter)
                             if rewriter else chunks, length if rewriter is None else None)
        timing.backend += time.perf_counter() - began  # streamed at the backend's pace
        return Reply(answer.status, headers, None)
    except (UpstreamError, TimeoutError) as exc:
        request.app.pool.count_error(backend)
        log.warning('PROXY_ERROR session=%s backend=%s reason="%s"', sid, backend.id, exc)
        if request.sent:  # the head is out: only closing the connection can tell the client
            request.abort()
        raise WebDriverError.unknown(f"backend {backend.id} failed mid-answer: {exc}") from None
    finally:
        answer.release()


@dataclass(slots=True)
class NewSession:
    """A new-session request, read and checked: what is sent to a backend, and for whom."""
    payload: dict
    body: bytes  # as sent to a backend: the client's, or rewritten for a W3C client
    cookie: str | None
    w3c_client: bool


def _new_session_request(request: Request, body: bytes) -> NewSession:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebDriverError.invalid_argument(f"new session body is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise WebDriverError.invalid_argument("new session body must be a JSON object")
    if bridge.client_dialect(payload) == "w3c":
        # Sent with desiredCapabilities too, as Selenium 3 clients did: GhostDriver reads those,
        # a W3C backend ignores them, and the answer's shape tells which one we reached.
        return NewSession(payload, json.dumps(bridge.new_session_request(payload)).encode(),
                          request.headers.get("cookie"), True)
    return NewSession(payload, body, request.headers.get("cookie"), False)


_ADMIT = object()  # _new_session's backend_id: none reserved yet


def _new_session_now(request: Request, app: App) -> Awaitable[Reply] | object:
    """A new session, checked, then usually sent on from here and answered from a callback,
    as a command is (a task, a shield and a few coroutines less per session: x0.68 of the
    Python per request of a new session + delete pair, benchmarks/hotpath.py --lifecycle).
    A body still arriving, a full pool (the queue), a backend gone or a failed attempt go on
    in `_new_session`, the coroutine, under the same rules; a bridged session's setup calls in
    `_bridge_setup`."""
    if app.state.shutting_down:
        raise WebDriverError.session_not_created("stickyproxy is shutting down")
    guard = app.guard
    wait = guard.limiter.take(request.remote or "-", time.monotonic())
    if wait:
        raise guard.refuse("rate", guard.too_fast(wait), request.remote)
    body = request.body.whole() if request.body is not None else b""
    if body is None:  # not all here yet (or over --max-body: the coroutine says so)
        return _new_session(request, app)
    new = _new_session_request(request, body)
    backend_id = app.queue.admit(new.cookie)
    backend = app.pool.backends.get(backend_id) if backend_id is not None else None
    if backend is None:  # to queue for a slot, or reserved on a backend just removed
        return _new_session(request, app, new, backend_id)
    request.timing.backend_id = backend_id
    try:
        backend.upstream.submit("POST", request.target, _sent_headers(request, new),
                                _sent_body(new, backend), app.timeout,
                                partial(_new_session_answered, request, app, new, backend,
                                        backend.spec.generation, time.perf_counter()),
                                replay_stale=True)
    except BaseException:
        app.pool.release(backend_id)  # a bug of ours (front.py answers 500): not a lost slot too
        raise
    return LATER


def _sent_body(new: NewSession, backend: Backend) -> bytes:
    """The new session as sent to `backend`: a Chrome backend's own arguments added for a W3C
    client (the provider's chrome_args)."""
    chrome_args = backend.spec.meta.get("chrome_args") if new.w3c_client else None
    if not chrome_args:
        return new.body
    return json.dumps(bridge.new_session_request(with_chrome_args(new.payload, chrome_args))).encode()


_CONTENT_TYPE = frozenset({b"content-type"})


def _sent_headers(request: Request, new: NewSession) -> bytes:
    if not new.w3c_client:
        return request.forward
    # The body was rewritten: its length is recomputed by upstream, its type stays JSON. The
    # rest as forwarded (front.py dropped hop-by-hop headers, those Connection lists, and
    # stickyproxy's own credentials).
    return (without_headers(request.forward, _CONTENT_TYPE)
            + b"Content-Type: application/json; charset=utf-8\r\n")


def _new_session_answered(request: Request, app: App, new: NewSession, backend: Backend,
                          generation: str, began: float, answer: Response | None,
                          exc: BaseException | None) -> None:
    """The backend's answer to a new session sent by `_new_session_now`: pinned and passed on.
    A failure, or an answer not all here, goes on in `_new_session`'s loop, which retries
    elsewhere only when the backend provably never saw the request."""
    request.timing.backend += time.perf_counter() - began
    reserved = True  # the slot pick() reserved, until released or handed on
    try:
        data = None
        if exc is None and answer.length is not None and answer.length <= WHOLE:
            data = answer.ready_body()
        if data is None:
            if request.gone:  # nobody to retry for, or to answer
                _abandoned(request, app, backend, generation, answer, exc)
                reserved = False
                _observe(request, 499)
                return
            if exc is not None:
                attempt = asyncio.get_running_loop().create_future()
                attempt.set_exception(exc)
            else:
                attempt = asyncio.ensure_future(_rest_of(request, answer))
            request.run(_answer_when_done(request, _new_session(
                request, app, new, backend.id, attempt=attempt, sent_to=(backend, generation))))
            reserved = False
            return
        try:  # pinned before the reservation is released, so the slot is never handed twice
            if request.gone:  # the client left while the backend created its session
                _orphan(app, backend, generation, answer, data, request.principal)
                _observe(request, 499)  # as _answer_when_done counts a client gone
                return
            try:
                reply = _pin(request, app, backend, generation, answer, data, new.cookie,
                             new.payload if new.w3c_client else None)
            except WebDriverError as err:
                reply = error_response(err)
        finally:
            answer.release()
            reserved = False
            app.pool.release(backend.id)
        if type(reply) is not Reply:  # a bridged session: its setup first, if it has any
            reply = _bridged_new_session(request, app, backend, reply)
        if not _reply_now(request, reply):
            return
    except Exception:
        if reserved:  # a bug of ours before the slot was released or handed on: not leaked
            app.pool.release(backend.id)
        _callback_failed(request, answer)
        return
    request.finish()


def _abandoned(request: Request, app: App, backend: Backend, generation: str,
               answer: Response | None, exc: BaseException | None) -> None:
    """A new session whose client left before its answer failed or came whole: no retry
    elsewhere for nobody; a session the rest of the answer brings is orphaned (`_orphaned`)."""
    if exc is not None:
        app.pool.count_error(backend)
        log.warning('SESSION_NOT_CREATED backend=%s reason="%s; its client had left"',
                    backend.id, str(exc) or "no answer in time")
        app.pool.release(backend.id)
        return
    asyncio.ensure_future(_rest_of(request, answer)).add_done_callback(
        partial(_orphaned_then_release, app, backend, generation, backend.id, request.principal))


async def _new_session(request: Request, app: App, new: NewSession | None = None,
                       backend_id: str | None | object = _ADMIT, tried: tuple[str, ...] = (),
                       attempt: asyncio.Future | None = None,
                       sent_to: tuple[Backend, str] | None = None) -> Reply:
    """A new session the callback way could not finish: placed (queued for a slot when the
    pool is full), sent, retried elsewhere only when the backend never saw it, pinned. It
    starts from what `_new_session_now` did: the request read (`new`), a backend reserved
    (`backend_id`), or an attempt already under way or failed (`attempt`, sent to `sent_to`'s
    backend and generation, kept here because the pool may have dropped or restarted it since:
    `_pin` then refuses the session, or ends it)."""
    pool, queue = app.pool, app.queue
    if new is None:
        try:
            body = await request.read()
        except BodyTooLarge as exc:
            raise _refused_body(app.guard, exc, request) from None
        new = _new_session_request(request, body)
    cookie, w3c_client = new.cookie, new.w3c_client
    if backend_id is _ADMIT:
        backend_id = queue.admit(cookie)
    while True:
        if backend_id is None:
            backend_id = await _wait_for_slot(request, app, cookie, tried)
        current = backend_id
        if attempt is not None:
            backend, generation = sent_to
        else:
            backend = pool.backends.get(backend_id)
            generation = backend.spec.generation if backend is not None else ""
        request.timing.backend_id = backend_id
        try:
            if backend is None:  # removed while we waited
                raise NotConnected("backend was removed")
            if attempt is None:
                attempt = asyncio.ensure_future(_attempt(
                    request, app, backend, _sent_headers(request, new), _sent_body(new, backend)))
            # Shielded: if the client leaves mid-attempt, a session the backend may create is
            # still learned, and deleted, instead of left running with nobody to quit it.
            try:
                answer, data = await asyncio.shield(attempt)
            except asyncio.CancelledError:
                # The backend may still create the session: its slot stays reserved until
                # the attempt ends and the session is pinned (then ended), as `_abandoned`
                # keeps it. Released now, the queue could fill it meanwhile: one over the cap.
                attempt.add_done_callback(partial(_orphaned_then_release, app, backend,
                                                  generation, current, request.principal))
                current = None
                raise
            finally:
                attempt = None  # (the next backend, if any, gets an attempt of its own)
            try:  # pinned before the reservation is released, so the slot is never handed twice
                pinned = _pin(request, app, backend, generation, answer, data, cookie,
                              new.payload if w3c_client else None)
            finally:
                answer.release()  # before a bridged setup, which may need this connection
            break
        except (NotConnected, UpstreamError, TimeoutError) as exc:
            why = str(exc) or "no answer in time"
            if backend is not None:
                app.pool.count_error(backend)
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
            if current is not None:
                pool.release(current)  # the reservation made by pick() or the queue
    if type(pinned) is Reply:
        return pinned
    # Outside the attempt's loop: the session exists, whatever its setup meets.
    reply = _bridged_new_session(request, app, backend, pinned)
    return reply if type(reply) is Reply else await reply


async def _wait_for_slot(request: Request, app: App, cookie: str | None,
                         tried: tuple[str, ...]) -> str:
    """Queue for a slot when backends are up but full, or when the only ones up are draining
    while their replacements start (recycling keeps capacity); fail at once when none could
    take it.

    The queue reserved the slot a tick before the waiter runs. If its backend stopped taking
    new sessions meanwhile (drained, down, or moved to an address not checked yet), the waiter
    is placed elsewhere if there is room, else waits again at the head of the queue for what
    is left of its time, even for a backend not up yet (see `SessionQueue.wait`). Either way
    it is one wait, in the histogram and the queue's stats."""
    pool, queue = app.pool, app.queue
    if app.state.shutting_down:
        raise WebDriverError.session_not_created("stickyproxy is shutting down")
    if not pool.could_take(tried) and not pool.replacing(tried):
        raise WebDriverError.session_not_created(_no_backend_message(pool, tried))
    timeout = app.queue_timeout
    began, again, refused = time.monotonic(), False, False
    try:
        while True:
            backend_id = await queue.wait(cookie, tried,
                                          max(0.0, began + timeout - time.monotonic()),
                                          began if again else None)
            if app.state.shutting_down:  # handed a slot in the tick shutdown began: not used
                pool.release(backend_id)
                raise WebDriverError.session_not_created("stickyproxy is shutting down")
            waited_for = pool.backends.get(backend_id)
            if waited_for is None or waited_for.takes_new_sessions:
                return backend_id  # (a backend removed meanwhile fails as not connected)
            stale, backend_id = backend_id, pool.pick(cookie, tried)
            pool.release(stale)
            if backend_id is not None:
                return backend_id
            again = True
    except QueueFull:
        refused = True  # refused at once: it never waited
        log.warning("SESSION_NOT_CREATED reason=queue_full length=%d", len(queue))
        raise WebDriverError.session_not_created(
            f"every backend is full and {len(queue)} new sessions are already waiting "
            f"(--max-queue {queue.max_length})", retry_after=max(1, round(timeout / 4))) from None
    except TimeoutError:
        log.warning("SESSION_NOT_CREATED reason=queue_timeout waited=%s", fmt(timeout))
        why = ("its turn came to a backend that stopped taking new sessions, and none had room "
               "for the rest of" if again else
               "the backends up were draining for recycling, and no replacement took sessions "
               "within" if not pool.could_take(tried) else "every backend stayed full for")
        raise WebDriverError.session_not_created(
            f"{why} {fmt(timeout)} (--queue-timeout); "
            f"{len(pool.backends)} backends, --max-sessions {pool.max_sessions}") from None
    finally:
        if not refused:
            waited = time.monotonic() - began
            request.timing.queued += waited
            app.metrics.observe_queue_wait(waited)


async def _attempt(request: Request, app: App, backend: Backend,
                   headers: bytes, body: bytes) -> tuple[Response, bytes]:
    answer = await request.timing.on_backend(backend.upstream.request(
        "POST", request.target, headers, body, timeout=app.timeout, replay_stale=True))
    return await _rest_of(request, answer)


async def _rest_of(request: Request, answer: Response) -> tuple[Response, bytes]:
    """A new-session answer whose head is here, with its whole body. Within the backend timeout,
    as the head was: an orphan's attempt holds a slot until it ends, so it must end."""
    try:
        async with asyncio.timeout(request.app.timeout):
            return answer, await request.timing.on_backend(answer.read())
    except BaseException:
        answer.release()
        raise


def _orphaned(app: App, backend: Backend, generation: str, attempt: asyncio.Future,
              owner: str) -> None:
    """The done callback of an attempt whose client left while it ran (see `_orphan`)."""
    if attempt.cancelled():
        return
    exc = attempt.exception()
    if isinstance(exc, (OSError, TimeoutError)):  # (a session it may have created is unknown
        app.pool.count_error(backend)             # to us: said, not silent)
        log.warning('SESSION_NOT_CREATED backend=%s reason="%s; its client had left"',
                    backend.id, str(exc) or "no answer in time")
        return
    if exc is not None:  # a bug of ours, not the backend's failure
        log.error("SESSION_NOT_CREATED backend=%s reason=\"%s; its client had left\"", backend.id,
                  type(exc).__name__, exc_info=exc)
        return
    answer, data = attempt.result()
    answer.release()
    _orphan(app, backend, generation, answer, data, owner)


def _orphaned_then_release(app: App, backend: Backend, generation: str, backend_id: str,
                           owner: str, attempt: asyncio.Future) -> None:
    """`_orphaned`, then the slot the attempt held given back."""
    try:  # pinned before the reservation is released, as always
        _orphaned(app, backend, generation, attempt, owner)
    finally:
        app.pool.release(backend_id)


def _orphan(app: App, backend: Backend, generation: str, answer: Response, data: bytes,
            owner: str) -> None:
    """A new session whose client left before its answer: pinned and ended at once (deleted on
    the backend), so it is counted and logged instead of leaking (`generation`: the backend's
    when the request was sent)."""
    try:
        sid = session_id_of(json.loads(data)) if 200 <= answer.status < 300 else None
    except ValueError:
        sid = None
    if not sid:
        return
    if _removed_meanwhile(app, backend, sid, ", and its client had left"):
        return
    if _id_in_use(app, backend, generation, sid, sid) is None:
        now = time.monotonic()
        app.sessions.pin(Session(sid, backend.id, backend.spec.generation, now, now, owner=owner))
        app.life.end(sid, EndReason.CLIENT_DELETE, "client left before the new session answer")


def _removed_meanwhile(app: App, backend: Backend, sid: str, why: str = "") -> bool:
    """Whether a new session's backend was removed (or re-added at a new address) while the
    request was out; then the session is counted and logged, not pinned. Removal ends its
    sessions and leaves answers in flight to arrive, so this one would be pinned to a backend
    that is gone. Like the sessions removal ended, it is not deleted there."""
    if app.pool.backends.get(backend.id) is backend:
        return False
    app.pool.count_error(backend)
    log.warning('SESSION_NOT_CREATED backend=%s session=%s reason="backend removed while it '
                'created the session%s; left on it"', backend.id, sid, why)
    return True


def _id_in_use(app: App, backend: Backend, generation: str, public: str,
               sid: str) -> Session | None:
    """The live session that already has a new session's id, if any: `public` as the table keys
    it, or `sid`, the backend's own, on that backend (under --session-key, another owner's
    session there has another public id). Then the new session is not pinned (a live session's
    client would be sent to it, or to the wrong backend): counted, logged, and deleted where it
    was made. `generation`: the backend's when the new session's request was sent.

    Another backend's live session keeps its id: a backend that numbers its sessions (1, 2,
    ...) gives out ids that another one already gave. A backend that gives out the id of one
    of its own live sessions has lost that one (restarted faster than health checks notice,
    or it reuses the ids of sessions it ended): its pin ends, not deleted there (that would
    delete the new one), so its client learns why. Unless the backend's process was replaced
    while the request was out: the answer may be the old process's, whose ids the new one
    gives out again, so nothing on the new process is touched (a DELETE would end the live
    session there)."""
    other = app.sessions.get(public) or app.sessions.holder(backend.id, sid)
    if other is None:
        return None
    app.pool.count_error(backend)
    log.warning('SESSION_NOT_CREATED backend=%s session=%s reason="id in use by a live session '
                'on %s"', backend.id, sid, other.backend_id)
    if other.backend_id != backend.id:
        app.life.delete(backend, sid)
    elif generation == backend.spec.generation:
        app.sessions.end(other.id, EndReason.BACKEND_DOWN,
                         "its backend gave the session's id to a new session: it was lost there")
        app.life.delete(backend, sid)
    return other


def _id_in_use_message(backend: Backend, generation: str, sid: str, other: Session) -> str:
    said = f"backend {backend.id} answered with session id {sid}, which a live session "
    if other.backend_id != backend.id:
        return (said + f"on backend {other.backend_id} has; the new session was deleted there "
                "(try again). Backends must not share session ids: with --session-key, ids "
                "carry their backend and cannot clash across backends")
    if generation != backend.spec.generation:
        return (said + "of its new process has: it was restarted while it created this one, "
                "which was dropped (try again)")
    return (said + "of its own had: that one was lost there and has ended, and the new one was "
            "deleted (try again)")


def _bridged_new_session(request: Request, app: App, backend: Backend,
                         pinned: tuple) -> Reply | Awaitable[Reply]:
    """A bridged session just pinned (`_pin`'s tuple): its answer, or the coroutine that runs
    its setup first."""
    status, parsed, sid, public, bridged = pinned
    setup = bridged.setup()
    if setup is None:
        return _json(status, parsed, backend)
    return _bridge_setup(request, app, backend, status, parsed, sid, public, setup)


async def _bridge_setup(request: Request, app: App, backend: Backend, status: int, parsed,
                        sid: str, public: str, setup: bridge.Step) -> Reply:
    """A bridged session's first calls (the timeouts its client asked for in its capabilities),
    then the new-session answer; `sid` is the backend's id. The session is pinned already: if
    its setup fails, or its client leaves meanwhile, it is ended (and deleted on the backend),
    since no client will ever learn its id."""
    try:
        reply = await bridge.run(setup, _sender(request, app, backend, sid))
    except (NotConnected, UpstreamError, TimeoutError) as exc:
        why = str(exc) or "no answer in time"
        app.pool.count_error(backend)
        app.life.end(public, EndReason.SETUP_FAILED, why)
        raise WebDriverError.session_not_created(
            f"backend {backend.id} created the session but failed its setup ({why}); "
            "the session was ended") from None
    except asyncio.CancelledError:
        app.life.end(public, EndReason.CLIENT_DELETE, "client left during the new session's setup")
        raise
    if reply.status != 200:
        app.life.end(public, EndReason.SETUP_FAILED, f"setup answered {reply.status}")
        return _json(reply.status, reply.body, backend)
    return _json(status, parsed, backend)


def _pin(request: Request, app: App, backend: Backend, generation: str, answer: Response,
         data: bytes, cookie: str | None, w3c_payload: dict | None):
    """Learn the session id from a backend's new-session answer and pin it (`generation`: the
    backend's when the request was sent): the reply (always,
    for a JSON Wire client), or for a W3C client (`w3c_payload` given) whose backend answered
    JSONWP, a bridged session as (status, parsed answer, backend's id, client's id, bridge),
    for `_bridged_new_session` to finish."""
    headers = _answer_headers(answer, backend)
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
        return Reply(answer.status, headers, data)
    else:
        sid = session_id_of(parsed)
    if sid is None:
        app.pool.count_error(backend)
        log.warning('SESSION_NOT_CREATED backend=%s reason="answer has no session id"', backend.id)
        raise WebDriverError.session_not_created(
            f"backend {backend.id} answered the new session without a session id")
    if _removed_meanwhile(app, backend, sid):
        raise WebDriverError.session_not_created(
            f"backend {backend.id} was removed while it created this session")
    owner = request.principal
    public = sid
    if app.key:  # the client's id carries its signed route (routes.py)
        public = routes.public_id(app.key, backend.spec.url, sid, owner, bridged is not None)
    other = _id_in_use(app, backend, generation, public, sid)
    if other is not None:
        raise WebDriverError.session_not_created(_id_in_use_message(backend, generation, sid, other))
    now = time.monotonic()
    if backend.spec.generation != generation:
        # Its process was replaced while the request was out, and the replacement ended the
        # old one's sessions. Which process created this one is unknown: the request may have
        # waited for a connection, or been sent again on a fresh one, and reached the new
        # process. So it is pinned and ended at once, as an orphan is: deleted on the current
        # process (where it may live, or a 404), counted and logged, and the client told.
        app.pool.count_error(backend)
        app.sessions.pin(Session(public, backend.id, backend.spec.generation, now, now,
                                 owner=owner, backend_sid=sid))
        app.life.end(public, EndReason.BACKEND_DOWN,
                     "backend process replaced while it created the session")
        raise WebDriverError.session_not_created(
            f"backend {backend.id} was restarted while it created this session; the session "
            "was ended")
    if public != sid:
        data = data.replace(sid.encode(), public.encode())
        if bridged is not None:
            parsed = json.loads(json.dumps(parsed).replace(sid, public))
    request.timing.session = public
    app.sessions.pin(Session(public, backend.id, generation, now, now, cookie or "",
                         bridge=bridged, owner=owner, backend_sid=sid))
    backend.sessions_total += 1
    backend.generation_sessions += 1
    backend.requests_total += 1
    app.life.consider(backend, now)
    if bridged is None:
        backend.dialect = "jsonwp" if isinstance(parsed, dict) and isinstance(
            parsed.get("status"), int) else "w3c"
        return Reply(answer.status, headers, data)
    backend.dialect = "jsonwp"
    return status, parsed, sid, public, bridged


def _json(status: int, body, backend: Backend) -> Reply:
    return Reply(status, [_JSON_TYPE, (_BACKEND_HEADER, backend.id.encode())],
                 json.dumps(body).encode())


def _sender(request: Request, app: App, backend: Backend, sid: str):
    """The bridge's `send`: one JSONWP call on the session's backend, parsed."""
    timing = request.timing

    async def send(method: str, subpath: str, body) -> tuple[int, object]:
        payload = None if body is None else json.dumps(body).encode()
        headers = [(b"Content-Type", b"application/json; charset=utf-8")] if payload else []
        app.pool.count_request(backend)  # (a setup may run on past the backend's removal)
        answer = await timing.on_backend(backend.upstream.request(
            method, f"/session/{sid}{subpath}", headers, payload, timeout=app.timeout))
        return await _result(request, answer)
    return send


async def _result(request: Request, answer: Response) -> tuple[int, object]:
    """A bridged call's answer read whole and released: (status, parsed body)."""
    try:
        raw = await request.timing.on_backend(answer.read(request.app.timeout))
    finally:
        answer.release()
    return answer.status, _parsed(raw)


def _parsed(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")


def _bridge_plan(request: Request, session: Session, rest: str, raw: bytes) -> bridge.Step:
    try:
        body = json.loads(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise WebDriverError.invalid_argument(f"body is not JSON: {exc}") from None
    return session.bridge.plan(request.method, rest, body)


def _bridged_command_now(request: Request, app: App, session: Session, backend: Backend,
                         rest: str, kind: Kind) -> Reply | Awaitable[Reply] | object:
    """A W3C command of a session on a JSONWP backend, planned by the bridge and run as a
    command is: each call sent from here or from the previous call's answer (`_BridgeRun`).
    A body still arriving goes to the coroutine (`_bridged_command`)."""
    raw = request.body.whole() if request.body is not None else b""
    if raw is None:
        return _bridged_command(request, app, session, backend, rest, kind)
    step = _bridge_plan(request, session, rest, raw)
    return _BridgeRun(request, app, session, backend, kind).advance(step, [])


class _BridgeRun:
    """bridge.run without a coroutine: a plan's calls submitted one by one, each from the
    answer of the one before. A heavy plan (its combine runs in a thread) or an answer too
    long to take whole goes on in `_bridged_run`, from the calls made so far."""

    __slots__ = ("request", "app", "session", "backend", "kind", "step", "results", "began")

    def __init__(self, request: Request, app: App, session: Session, backend: Backend,
                 kind: Kind) -> None:
        self.request, self.app, self.session, self.backend, self.kind = (
            request, app, session, backend, kind)
        self.step: bridge.Plan | None = None
        self.results: list = []
        self.began = 0.0

    def advance(self, step: bridge.Step, results: list) -> Reply | Awaitable[Reply] | object:
        """The reply, LATER (a call is on its way), or the coroutine that finishes."""
        while isinstance(step, bridge.Plan):
            call = bridge.next_call(step, results)
            if call is not None:
                self.step, self.results = step, results
                self._send(*call)
                return LATER
            if step.heavy:
                return _bridged_run(self.request, self.app, self.session, self.backend,
                                    self.kind, step, results)
            step, results = step.reply(results), []
        return _bridged_reply(self.app, self.session, self.backend, self.kind, step)

    def _send(self, method: str, subpath: str, body) -> None:
        payload = None if body is None else json.dumps(body).encode()
        backend = self.backend
        self.app.pool.count_request(backend)  # (a bridged command's later calls may outlive it)
        self.began = time.perf_counter()
        backend.upstream.submit(method, f"/session/{self.session.backend_sid}{subpath}",
                                _JSON_LINE if payload else b"", payload, self.app.timeout,
                                self._answered)

    def _answered(self, answer: Response | None, exc: BaseException | None) -> None:
        request = self.request
        request.timing.backend += time.perf_counter() - self.began
        try:
            try:
                if exc is not None:
                    raise _command_failed(self.app, self.session.id, self.kind, self.backend, exc)
                raw = None
                if answer.length is not None and answer.length <= WHOLE:
                    raw = answer.ready_body()
                if raw is None:  # long (a big screenshot): read on by a coroutine
                    step = _bridged_run(request, self.app, self.session, self.backend,
                                        self.kind, self.step, self.results, answer)
                else:
                    answer.release()
                    self.results.append((answer.status, _parsed(raw)))
                    step = self.advance(self.step, self.results)
            except WebDriverError as err:
                step = error_response(err)
            if step is LATER or not _reply_now(request, step):
                return
        except Exception:
            _callback_failed(request, answer)
            return
        request.finish()


async def _bridged_command(request: Request, app: App, session: Session, backend: Backend,
                           rest: str, kind: Kind) -> Reply:
    """A W3C command of a session on a JSONWP backend whose body is still arriving."""
    step = _bridge_plan(request, session, rest, await _body(request, app.guard) or b"")
    return await _bridged_run(request, app, session, backend, kind, step)


async def _bridged_run(request: Request, app: App, session: Session, backend: Backend,
                       kind: Kind, step: bridge.Step, made: list | tuple = (),
                       answer: Response | None = None) -> Reply:
    """A bridged command run by the bridge's coroutine, from the calls of `step` already
    `made` and the `answer` of the next one, if it came but not whole."""
    try:
        if answer is not None:
            made = [*made, await _result(request, answer)]
        reply = await bridge.run(step, _sender(request, app, backend, session.backend_sid),
                                 made=made)
    except (NotConnected, UpstreamError, TimeoutError) as exc:
        raise _command_failed(app, session.id, kind, backend, exc) from None
    return _bridged_reply(app, session, backend, kind, reply)


def _bridged_reply(app: App, session: Session, backend: Backend, kind: Kind,
                   reply: bridge.Reply) -> Reply:
    if kind is Kind.DELETE_SESSION:
        app.sessions.end(session.id, EndReason.CLIENT_DELETE)
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


def make_port(app: App, *, idle_timeout: float, max_header_size: int,
              outbox: Outbox | None = None) -> Port:
    """The WebDriver port: `handle` for every request, whatever its target (no router: unknown
    targets get a WebDriver error, never a text/plain 404)."""
    guard = app.guard

    def bad_request(why: str | None, client: str | None) -> tuple[int, list[Header], bytes]:
        if why is None:  # a handler failed: a bug of ours, still answered as WebDriver
            err = WebDriverError.unknown("stickyproxy failed on this request (see its log)")
        else:
            err = guard.refuse("bad_request", WebDriverError.invalid_argument(
                f"bad HTTP request: {why}"), client)
        reply = error_response(err)
        return reply.status, reply.headers, reply.body

    def too_many(client: str | None) -> tuple[int, list[Header], bytes]:
        limit = guard.max_connections
        reply = error_response(guard.refuse("connections", WebDriverError(
            429, "unknown error", f"too many connections to stickyproxy (--max-connections "
                                  f"{limit}); retry shortly", {"Retry-After": "1"}), client))
        return reply.status, reply.headers, reply.body

    return Port(handle, app=app, idle_timeout=idle_timeout, max_header_size=max_header_size,
                max_body=guard.max_body, max_connections=guard.max_connections, outbox=outbox,
                not_forwarded=_not_forwarded(guard), on_bad_request=bad_request,
                on_too_many=too_many)


def _not_forwarded(guard: Guard) -> frozenset[bytes]:
    """Request headers no backend is sent: hop-by-hop ones, and with --auth-token or
    --auth-users the client's credentials, which are stickyproxy's (a backend may be a
    container, a host found by DNS or someone else's grid)."""
    return HOP_BY_HOP | {b"authorization"} if guard.auth.enabled else HOP_BY_HOP
