"""The Idempotency-Key header for any WSGI or ASGI application.

    app = IdempotencyMiddleware(app, IdempotencyLayer("redis://127.0.0.1:6379"))
    app = IdempotencyASGIMiddleware(app, layer)

A covered request (POST and PATCH by default) that carries the header runs
the application once per key: retries get the stored status, header fields
and body with ``Idempotent-Replayed: true``; a retry while the first runs
gets 409 with Retry-After; the key with another method, path or body gets
422; a malformed key 400 and a failing store 503, as RFC 9457 documents
made by the library's HTTP layer. A 5xx from the application, or an
exception, frees the key so that a retry runs again. Requests without the
header pass through unless ``required=True`` (then 400).
"""

import asyncio
import http
import io
import logging

from . import _idempotency as _c
from . import (Claim, ClaimLost, IdempotencyError, IdempotencyLayer, Reply, ResponseTooLarge, _abort,
               _key_text)

log = logging.getLogger("idempotency")

# Header fields of one transfer, which the server sends for each response
# itself: storing them would replay a stale length, date or connection.
_NOT_STORED = frozenset({
    "connection", "content-length", "date", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "server", "te", "trailer", "transfer-encoding", "upgrade",
})


def _reason(status):
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Base:
    def __init__(self, app, layer=None, *, methods=("POST", "PATCH"), required=False):
        self.app = app
        self.layer = layer if layer is not None else IdempotencyLayer()
        self.methods = frozenset(m.upper() for m in methods)
        self.required = required
        # Keys the layer accepts, and not a byte more (http.h).
        self.key_size = int(self.layer.options.get("max_key_len") or 255) + 1

    def _covered(self, method, lines):
        return method in self.methods and (lines or self.required)

    def _begin(self, key, method, path, body):
        """A Claim, or the answer to send (status, headers, body)."""
        fp = _c.http_fingerprint(method, path, body)
        try:
            got = self.layer.begin(key, fp)
        except IdempotencyError as e:
            log.error("idempotency key %s: %s", _key_text(key), e)
            return _c.http_error_answer(e.code)
        return got.http_answer() if isinstance(got, Reply) else got

    @staticmethod
    def _finish(claim, key, status, headers, body):
        """Store a response of the application, or free the key after a 5xx."""
        if status >= 500:
            _abort(claim, key)
            return
        stored = [(n, v) for n, v in headers if n.lower() not in _NOT_STORED]
        try:
            claim.commit(status, body, stored)
            return
        except (ResponseTooLarge, ValueError) as e:
            # Too large, or header fields the library refuses to store. The
            # work is done, so the key must not be freed for a retry to do
            # it again: retries get a 500 document that says so.
            log.error("idempotency key %s: response not storable: %s", _key_text(key), e)
            status, stored, body = _c.http_problem(
                500, "The request was processed, but its response could not be stored for replay.")
        except ClaimLost as e:
            log.error("idempotency key %s: %s", _key_text(key), e)
            return
        except IdempotencyError as e:
            # The store failed for the whole lease: keep the key claimed
            # until the lease ends rather than free it for a retry.
            claim.abandon()
            log.error("idempotency key %s: response not stored: %s", _key_text(key), e)
            return
        try:
            try:
                claim.commit(status, body, stored)
            except ResponseTooLarge:
                # A max_response_len below the document's size: an empty
                # body fits any limit.
                claim.commit(status, b"")
        except ClaimLost:
            pass
        except IdempotencyError as e:
            claim.abandon()
            log.error("idempotency key %s: response not stored: %s", _key_text(key), e)


class IdempotencyMiddleware(_Base):
    """WSGI middleware: IdempotencyMiddleware(app, layer=None, *,
    methods=("POST", "PATCH"), required=False). layer None: IdempotencyLayer()."""

    def __call__(self, environ, start_response):
        method = environ.get("REQUEST_METHOD", "GET").upper()
        line = environ.get("HTTP_IDEMPOTENCY_KEY")
        lines = [] if line is None else [line]
        if not self._covered(method, lines):
            return self.app(environ, start_response)
        key, refusal = _c.http_key_parse(lines, self.key_size)
        if refusal is not None:
            return _wsgi_send(start_response, refusal)

        # The body is read whole, for the fingerprint, and handed on.
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            path += "?" + environ["QUERY_STRING"]

        got = self._begin(key, method, path, body)
        if not isinstance(got, Claim):
            return _wsgi_send(start_response, got)

        started = []
        chunks = []

        def capture(status, headers, exc_info=None):
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, list(headers)]
            return chunks.append

        try:
            result = self.app(environ, capture)
            try:
                chunks.extend(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            if not started:
                raise RuntimeError("the WSGI application did not call start_response")
        except BaseException:
            _abort(got, key)
            raise
        status_line, headers = started
        body = b"".join(chunks)
        self._finish(got, key, int(status_line.split(None, 1)[0]), headers, body)
        headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        start_response(status_line, headers + [("Content-Length", str(len(body)))])
        return [body]


def _wsgi_send(start_response, answer):
    status, headers, body = answer
    start_response(f"{status} {_reason(status)}", headers + [("Content-Length", str(len(body)))])
    return [body]


class IdempotencyASGIMiddleware(_Base):
    """ASGI middleware (HTTP scopes; others pass through), with the
    arguments of IdempotencyMiddleware. Store calls run in a thread, never
    on the event loop."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"].upper()
        lines = [v.decode("latin-1") for n, v in scope["headers"] if n.lower() == b"idempotency-key"]
        if not self._covered(method, lines):
            return await self.app(scope, receive, send)
        key, refusal = _c.http_key_parse(lines, self.key_size)
        if refusal is not None:
            return await _asgi_send(send, refusal)

        parts = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(parts)
        path = (scope.get("raw_path") or scope["path"].encode("utf-8")).decode("latin-1")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")

        got = await asyncio.to_thread(self._begin, key, method, path, body)
        if not isinstance(got, Claim):
            return await _asgi_send(send, got)

        body_given = False

        async def app_receive():
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        start = None
        chunks = []
        done = False

        async def app_send(message):
            nonlocal start, done
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or done:
                return
            if start is None:
                raise RuntimeError("the ASGI application sent a body before http.response.start")
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            # The whole response: store it before the client sees its end,
            # so that a retry after this answer is a replay.
            done = True
            out = b"".join(chunks)
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in start.get("headers", [])]
            await asyncio.to_thread(self._finish, got, key, start["status"], headers, out)
            await send(start)
            await send({"type": "http.response.body", "body": out, "more_body": False})

        try:
            await self.app(scope, app_receive, app_send)
            if not done:
                raise RuntimeError("the ASGI application did not send a whole response")
        except BaseException:
            if not done:
                await asyncio.to_thread(_abort, got, key)
            raise
        return None


async def _asgi_send(send, answer):
    status, headers, body = answer
    raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]
    raw.append((b"content-length", str(len(body)).encode("ascii")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
