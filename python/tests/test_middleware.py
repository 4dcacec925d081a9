"""The WSGI middleware over real HTTP (wsgiref on 127.0.0.1, one thread per
request) and the ASGI middleware driven by asyncio."""

import asyncio
import http.client
import json
import socketserver
import sqlite3
import threading
import wsgiref.simple_server

import pytest

import idempotency
from idempotency import IdempotencyASGIMiddleware, IdempotencyMiddleware


class _Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, *args):
        pass


class PaymentApp:
    """A WSGI payment API: POST /payments charges once per call it gets."""

    def __init__(self):
        self.charges = []
        self.entered = threading.Event()  # a request with X-Demo-Hold is inside
        self.release = threading.Event()  # ... and may finish

    def __call__(self, environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(length) or b"{}")
        if environ.get("HTTP_X_DEMO_HOLD"):
            self.entered.set()
            self.release.wait(10)
        if environ.get("HTTP_X_DEMO_FAIL"):
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"card processor down"]
        if environ.get("HTTP_X_DEMO_RAISE"):
            raise RuntimeError("bug in the application")
        self.charges.append(body.get("amount"))
        pid = f"pay_{len(self.charges)}"
        start_response("201 Created", [("Content-Type", "application/json"),
                                       ("Location", f"/payments/{pid}"),
                                       ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")])
        return [json.dumps({"id": pid, "amount": body.get("amount")}).encode()]


@pytest.fixture
def serve():
    servers = []

    def start(app):
        server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, server_class=_Server,
                                                   handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _post(port, body, key=None, path="/payments", method="POST", **headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    h = {"Content-Type": "application/json"}
    if key is not None:
        h["Idempotency-Key"] = key
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    conn.request(method, path, body=json.dumps(body).encode(), headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, data


def _problem(headers, data, status):
    assert headers["Content-Type"] == "application/problem+json"
    doc = json.loads(data)
    assert doc["status"] == status and doc["title"] and doc["detail"]
    return doc


def test_wsgi_first_request_then_replays(layer, serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    status, headers, data = _post(port, {"amount": 100}, key='"order-1"')
    assert status == 201 and json.loads(data) == {"id": "pay_1", "amount": 100}
    assert headers["Location"] == "/payments/pay_1" and "Idempotent-Replayed" not in headers
    for _ in range(2):
        again = _post(port, {"amount": 100}, key="order-1")  # a bare token is the same key
        assert again[0] == 201 and again[2] == data
        assert again[1]["Location"] == "/payments/pay_1"
        assert again[1]["Content-Type"] == "application/json"
        assert again[1]["Idempotent-Replayed"] == "true"
        assert again[1]["Date"] != "Mon, 01 Jan 2024 00:00:00 GMT"  # not stored: the server's own
    assert app.charges == [100]


def test_wsgi_concurrent_duplicate_is_409_with_retry_after(layer, serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    first = []
    t = threading.Thread(target=lambda: first.append(
        _post(port, {"amount": 5}, key="slow", X_Demo_Hold="1")))
    t.start()
    assert app.entered.wait(10)
    try:
        status, headers, data = _post(port, {"amount": 5}, key="slow")
    finally:
        app.release.set()
        t.join()
    assert status == 409 and int(headers["Retry-After"]) >= 1
    _problem(headers, data, 409)
    assert first[0][0] == 201 and app.charges == [5]


def test_wsgi_same_key_other_request_is_422(layer, serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    assert _post(port, {"amount": 1}, key="k")[0] == 201
    status, headers, data = _post(port, {"amount": 2}, key="k")
    assert status == 422
    _problem(headers, data, 422)
    assert _post(port, {"amount": 1}, key="k", path="/payments?x=1")[0] == 422
    assert app.charges == [1]


def test_wsgi_malformed_key_is_400(layer, serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    for bad in ['"unterminated', "", "a b"]:
        status, headers, data = _post(port, {"amount": 1}, key=bad)
        assert status == 400
        _problem(headers, data, 400)
    assert app.charges == []


def test_wsgi_required_and_uncovered_requests(layer, serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    assert _post(port, {"amount": 1})[0] == 201  # no key: passes through
    assert _post(port, {"amount": 1}, key="g", method="PUT")[0] == 201  # not covered
    assert _post(port, {"amount": 1}, key="g", method="PUT")[0] == 201
    assert app.charges == [1, 1, 1]
    strict = serve(IdempotencyMiddleware(app, layer, required=True))
    status, headers, data = _post(strict, {"amount": 1})
    assert status == 400
    _problem(headers, data, 400)


def test_wsgi_5xx_and_exceptions_free_the_key(layer, serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    status, _, data = _post(port, {"amount": 3}, key="f", X_Demo_Fail="1")
    assert status == 503 and data == b"card processor down"
    assert _post(port, {"amount": 3}, key="f", X_Demo_Raise="1")[0] == 500  # wsgiref's own 500
    status, headers, _ = _post(port, {"amount": 3}, key="f")
    assert status == 201 and "Idempotent-Replayed" not in headers
    assert _post(port, {"amount": 3}, key="f")[1]["Idempotent-Replayed"] == "true"
    assert app.charges == [3]


class _FailingLayer:
    """A layer whose store is down: begin raises what the library raises."""

    options = {}

    def begin(self, key, fingerprint=None, scope=None):
        idempotency.IdempotencyLayer("sqlite:///dev/null/idem.db")


def test_wsgi_store_failure_is_503(serve):
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, _FailingLayer()))
    status, headers, data = _post(port, {"amount": 1}, key="down")
    assert status == 503 and headers["Retry-After"] == "1"
    doc = _problem(headers, data, 503)
    assert "/dev/null" not in doc["detail"]  # the store's detail stays in the server's log
    assert app.charges == []


# ---- ASGI ----

async def payment_asgi(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    payment_asgi.charges.append(body)
    await payment_asgi.release.wait()
    await send({"type": "http.response.start", "status": 201,
                "headers": [(b"content-type", b"application/json"), (b"location", b"/payments/1")]})
    await send({"type": "http.response.body", "body": b'{"id":', "more_body": True})
    await send({"type": "http.response.body", "body": b'"1"}'})


async def _asgi_call(app, key, body=b'{"amount":1}', method="POST"):
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"idempotency-key", key.encode()))
    scope = {"type": "http", "method": method, "path": "/payments", "raw_path": b"/payments",
             "query_string": b"", "headers": headers}
    chunks = [{"type": "http.request", "body": body[:3], "more_body": True},
              {"type": "http.request", "body": body[3:], "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    headers = {n.decode().lower(): v.decode() for n, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def test_asgi(layer):
    payment_asgi.charges = []
    app = IdempotencyASGIMiddleware(payment_asgi, layer)

    async def scenario():
        payment_asgi.release = asyncio.Event()
        first = asyncio.create_task(_asgi_call(app, "a"))
        while not payment_asgi.charges:  # until the first is inside the application
            await asyncio.sleep(0.01)
        busy = await _asgi_call(app, "a")
        payment_asgi.release.set()
        assert (await first)[0] == 201
        assert busy[0] == 409
        assert busy[1]["content-type"] == "application/problem+json" and int(busy[1]["retry-after"]) >= 1
        status, headers, body = await _asgi_call(app, "a")
        assert (status, body) == (201, b'{"id":"1"}')
        assert headers["idempotent-replayed"] == "true" and headers["location"] == "/payments/1"
        assert (await _asgi_call(app, "a", body=b'{"amount":2}'))[0] == 422
        assert (await _asgi_call(app, '"bad'))[0] == 400
        assert (await _asgi_call(app, None))[0] == 201  # no key: passes through
        assert (await _asgi_call(app, "a", method="GET"))[0] == 201

    asyncio.run(scenario())
    assert payment_asgi.charges == [b'{"amount":1}'] * 3


def test_wsgi_store_busy_is_503(tmp_path, serve):
    # A real store failing: SQLite's write lock held past busy_timeout_ms.
    db = tmp_path / "busy.db"
    layer = idempotency.IdempotencyLayer(f"sqlite://{db}?busy_timeout_ms=200")
    layer.begin("warm-up").commit(200, b"")
    app = PaymentApp()
    port = serve(IdempotencyMiddleware(app, layer))
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        status, headers, data = _post(port, {"amount": 1}, key="busy")
    finally:
        lock.execute("COMMIT")
    assert status == 503 and headers["Retry-After"] == "1"
    _problem(headers, data, 503)
    assert app.charges == []
    assert _post(port, {"amount": 1}, key="busy")[0] == 201  # the store is back


def test_wsgi_response_too_large_to_store_is_not_run_twice(make_layer, serve):
    layer = make_layer(max_response_len=400)
    app = PaymentApp()

    def big(environ, start_response):
        app(environ, lambda status, headers: None)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"x" * 1000]

    port = serve(IdempotencyMiddleware(big, layer))
    status, _, data = _post(port, {"amount": 1}, key="big")
    assert status == 200 and data == b"x" * 1000  # the first client gets the real answer
    status, headers, data = _post(port, {"amount": 1}, key="big")
    assert status == 500 and headers["Idempotent-Replayed"] == "true"
    _problem(headers, data, 500)
    assert app.charges == [1]
