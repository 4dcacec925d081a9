#!/usr/bin/env python3
"""The nginx module, end to end: Debian's nginx with the module built here,
in front of an upstream this script runs and counts, on free 127.0.0.1 ports.

    test_module.py MODULE.so [CASE ...]

Every server (nginx, redis-server) is started with a prefix of its own and
stopped by PID. A server that cannot be started fails the run. The upstream
counts each (path, key) that reaches it: a key it sees twice while its
record lives fails the case that sent it.
"""
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NGINX = os.environ.get("NGINX", "/usr/sbin/nginx")
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}")


def started(proc, port, what):
    """Wait for a server just started; one that never listens is stopped."""
    try:
        wait_port(port, proc, what)
    except RuntimeError:
        stop(proc, signal.SIGKILL)
        raise


def stop(proc, sig=signal.SIGTERM):
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


# ---------------------------------------------------------------------------
# The upstream: what reaches it, per path and key
# ---------------------------------------------------------------------------

class Upstream:
    def __init__(self):
        self.lock = threading.Lock()
        self.seen = {}          # (path without query, key) -> count
        self.next_id = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        # a client nginx gave up on is part of the cases, not an error
        self.server.handle_error = lambda request, address: None
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, path, key):
        with self.lock:
            return self.seen.get((path, key), 0)

    def _arrive(self, path, key):
        with self.lock:
            n = self.seen.get((path, key), 0) + 1
            self.seen[(path, key)] = n
            self.next_id += 1
            return n, self.next_id

    def _handler(self):
        up = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            break
                        data += chunk
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def _send(self, status, body=b"", headers=()):
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.do_POST()

            def do_HEAD(self):
                up._arrive(self.path.partition("?")[0], self.headers.get("Idempotency-Key"))
                self._send(201)

            def do_PATCH(self):
                self.do_POST()

            def do_POST(self):
                body = self._body()
                path, _, query = self.path.partition("?")
                args = dict(p.split("=", 1) for p in query.split("&") if "=" in p)
                key = self.headers.get("Idempotency-Key")
                n, ident = up._arrive(path, key)
                time.sleep(int(args.get("ms", self.headers.get("X-Delay-Ms", 0))) / 1000)
                first = n == 1
                kind = path.rsplit("/", 1)[-1]
                if kind == "flaky" and first:
                    return self._send(503, b"try again")
                if kind == "timeout" and first:
                    time.sleep(3)
                if kind == "big":
                    return self._send(200, b"x" * int(args["n"]),
                                      [("Content-Type", "application/octet-stream")])
                if kind == "empty":
                    return self._send(204)
                if kind == "empty200":
                    return self._send(200, b"", [("Content-Type", "text/plain")])
                if kind == "chunked":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for part in (b"alpha,", b"beta,", b"gamma"):
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    return None
                if kind == "cutoff" and first:
                    # half the body, then the upstream goes away
                    self.send_response(200)
                    self.send_header("Content-Length", "20")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    self.wfile.flush()
                    self.close_connection = True
                    return None
                if kind == "cut":
                    # headers and a first part, then a pause, then the rest
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "20")
                    self.end_headers()
                    self.wfile.write(b"0123456789")
                    self.wfile.flush()
                    time.sleep(1.5)
                    try:
                        self.wfile.write(b"abcdefghij")
                    except OSError:
                        pass
                    return None
                doc = {"id": ident, "method": self.command, "body": body.decode()}
                return self._send(201, json.dumps(doc).encode(), [
                    ("Content-Type", "application/json"),
                    ("Location", f"/payments/{ident}"),
                    ("X-Charge", f"ch_{ident}"),
                ])

        return Handler


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

class Redis:
    def __init__(self, root, port=None):
        self.port = port or free_port()
        self.dir = os.path.join(root, f"redis-{self.port}")
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started(self.proc, self.port, "redis-server")

    def url(self):
        return f"redis://127.0.0.1:{self.port}?timeout_ms=1500&connect_timeout_ms=500"

    def stop(self):
        stop(self.proc)


class Memcached:
    def __init__(self):
        self.port = free_port()
        argv = [shutil.which("memcached") or "/usr/bin/memcached", "-l", "127.0.0.1",
                "-p", str(self.port), "-U", "0", "-m", "16"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]    # memcached refuses to run as root
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started(self.proc, self.port, "memcached")

    def url(self):
        return f"memcached://127.0.0.1:{self.port}"

    def stop(self):
        stop(self.proc)


LOCATIONS = """
        location /pay/ {{ idempotency on; proxy_pass http://up; }}
        location /scoped/ {{ idempotency on; idempotency_scope $http_x_client;
                            proxy_pass http://up; }}
        location /required/ {{ idempotency on; idempotency_required on;
                              proxy_pass http://up; }}
        location /prefixed/ {{ idempotency on; idempotency_key_prefix "other:";
                              proxy_pass http://up; }}
        location /short/ {{ idempotency on; idempotency_lease 2s; proxy_pass http://up; }}
        location /renewed/ {{ idempotency on; idempotency_lease 1s; proxy_pass http://up; }}
        location /slowread/ {{ idempotency on; idempotency_lease 2s; proxy_read_timeout 1s;
                              proxy_pass http://up; }}
        location /unbuffered/ {{ idempotency on; idempotency_lease 2s; proxy_buffering off;
                                proxy_pass http://up; }}
        location /down/ {{ idempotency on; proxy_pass http://127.0.0.1:{down}; }}
        location /downpage/ {{ idempotency on; proxy_pass http://127.0.0.1:{down};
                              error_page 502 /oops; }}
        location = /oops {{ return 502 "oops"; }}
        location /plain/ {{ proxy_pass http://up; }}
"""


class Nginx:
    def __init__(self, root, module, store, upstream, name, workers=2, extra=""):
        self.prefix = os.path.join(root, name)
        for d in ("logs", "tmp", "conf"):
            os.makedirs(os.path.join(self.prefix, d), exist_ok=True)
        # workers run as nobody when this runs as root: the prefix must be
        # theirs to read
        os.chmod(root, 0o755)
        os.chmod(self.prefix, 0o755)
        self.port = free_port()
        self.module = module
        self.conf = os.path.join(self.prefix, "conf", "nginx.conf")
        self.write(store, upstream, workers, extra)
        self.proc = None

    def write(self, store, upstream, workers, extra=""):
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        tmp = os.path.join(self.prefix, "tmp")
        store_line = f"idempotency_store {store};" if store else ""
        text = f"""
load_module {self.module};
{user}
worker_processes {workers};
error_log logs/error.log info;
pid logs/nginx.pid;
events {{ worker_connections 256; accept_mutex off; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    {store_line}
    upstream up {{ server 127.0.0.1:{upstream.port}; }}
    add_header X-Worker $pid always;
    server {{
        listen 127.0.0.1:{self.port} reuseport;
        {LOCATIONS.format(down=free_port())}
        {extra}
    }}
}}
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def test_config(self):
        return subprocess.run([NGINX, "-t", "-p", self.prefix, "-c", self.conf],
                              capture_output=True, text=True)

    def start(self):
        # what nginx says before its error log is open goes to a file: a pipe
        # nobody reads could fill and stop it
        with open(os.path.join(self.prefix, "logs", "stderr.log"), "ab") as err:
            self.proc = subprocess.Popen(
                [NGINX, "-p", self.prefix, "-c", self.conf, "-g", "daemon off;"],
                stdout=subprocess.DEVNULL, stderr=err)
        started(self.proc, self.port, "nginx")
        return self

    def reload(self):
        os.kill(self.proc.pid, signal.SIGHUP)

    def workers(self):
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    pids.append(int(entry))
        return pids

    def log(self):
        with open(os.path.join(self.prefix, "logs", "error.log"), errors="replace") as f:
            return f.read()

    def stop(self):
        stop(self.proc, signal.SIGQUIT)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------

class Resp:
    def __init__(self, r):
        self.status = r.status
        self.headers = {k.lower(): v for k, v in r.getheaders()}
        self.body = r.read()

    def h(self, name):
        return self.headers.get(name.lower())

    def __repr__(self):
        return f"<{self.status} {self.headers} {self.body[:200]!r}>"


def request(port, method, path, key=None, body=b"", headers=None, keys=None, chunked=False,
            timeout=15):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    hdrs = dict(headers or {})
    conn.putrequest(method, path)
    for k in keys if keys is not None else ([key] if key is not None else []):
        conn.putheader("Idempotency-Key", k)
    for k, v in hdrs.items():
        conn.putheader(k, v)
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for i in range(0, len(body), 3):
            part = body[i:i + 3]
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
        conn.send(b"0\r\n\r\n")
    else:
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
    try:
        return Resp(conn.getresponse())
    finally:
        conn.close()


def replay(*args, **kwargs):
    """A retry as a client sends it: again after a 409 (the response it
    repeats is committed just after its last byte left nginx)."""
    end = time.monotonic() + 3
    while True:
        r = request(*args, **kwargs)
        if r.status != 409 or time.monotonic() > end:
            return r
        time.sleep(0.05)


class Background(threading.Thread):
    """A request sent in a thread; .result once joined."""

    def __init__(self, *args, **kwargs):
        super().__init__(daemon=True)
        self.args, self.kwargs, self.result, self.error = args, kwargs, None, None
        self.start()

    def run(self):
        try:
            self.result = request(*self.args, **self.kwargs)
        except Exception as e:  # noqa: BLE001 - kept for the case to check
            self.error = e

    def get(self):
        self.join(30)
        if self.error:
            raise self.error
        return self.result


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def eq(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def wait_for(cond, what, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


_keys = iter(range(1, 1 << 30))


def new_key(tag="k"):
    return f"{tag}-{os.getpid()}-{next(_keys)}"


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

AMOUNT_1 = json.dumps({"amount": 1}).encode()


def pay(env, path, key, amount=1, port=None, **kw):
    body = json.dumps({"amount": amount}).encode()
    return request(port or env.a.port, "POST", path, key, body, **kw)


def replay_pay(env, path, key, amount=1, port=None, **kw):
    body = json.dumps({"amount": amount}).encode()
    return replay(port or env.a.port, "POST", path, key, body, **kw)


def case_replay_with_header_fields(env):
    key = new_key()
    first = pay(env, "/pay/charge", key)
    eq(first.status, 201, "first answer")
    check(first.h("idempotent-replayed") is None, "a first answer is no replay")
    again = replay_pay(env, "/pay/charge", key)
    eq(again.status, 201, "replayed status")
    eq(again.body, first.body, "replayed body")
    for name in ("Content-Type", "Location", "X-Charge"):
        eq(again.h(name), first.h(name), f"replayed {name}")
    eq(again.h("idempotent-replayed"), "true", "Idempotent-Replayed")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_bare_and_string_keys(env):
    key = new_key("bare")
    eq(pay(env, "/pay/charge", key).status, 201, "bare key")
    again = replay_pay(env, "/pay/charge", f'"{key}"')
    eq(again.h("idempotent-replayed"), "true", "sf-string of the same key replays")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_mismatch_422(env):
    key = new_key()
    eq(pay(env, "/pay/charge", key, amount=1).status, 201, "first")
    other = pay(env, "/pay/charge", key, amount=2)
    eq(other.status, 422, "other body")
    eq(other.h("content-type"), "application/problem+json", "problem document")
    eq(json.loads(other.body)["status"], 422, "problem status")
    eq(pay(env, "/pay/charge?x=1", key).status, 422, "other query")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_bad_keys_400(env):
    for keys in (['"unterminated'], ["a b"], ["k1", "k2"], [""]):
        r = pay(env, "/pay/charge", None, keys=keys)
        eq(r.status, 400, f"keys {keys!r}")
        eq(r.h("content-type"), "application/problem+json", "problem document")
    r = pay(env, "/required/charge", None)
    eq(r.status, 400, "no key where one is required")
    eq(env.up.count("/required/charge", None), 0, "upstream arrivals")


def case_no_key_passes_through(env):
    for _ in range(2):
        eq(pay(env, "/pay/nokey", None).status, 201, "without a key")
    eq(env.up.count("/pay/nokey", None), 2, "both reach the upstream")


def case_get_and_head_pass_through(env):
    key = new_key()
    for method in ("GET", "GET", "HEAD"):
        r = request(env.a.port, method, "/pay/read", key)
        eq(r.status, 201, method)
        check(r.h("idempotent-replayed") is None, f"{method} is no replay")
    eq(env.up.count("/pay/read", key), 3, "every GET and HEAD reaches the upstream")


def case_patch_is_covered(env):
    key = new_key()
    first = request(env.a.port, "PATCH", "/pay/patch", key, b"{}")
    again = replay(env.a.port, "PATCH", "/pay/patch", key, b"{}")
    eq(again.h("idempotent-replayed"), "true", "PATCH replays")
    eq(again.body, first.body, "replayed body")
    eq(env.up.count("/pay/patch", key), 1, "upstream arrivals")


def case_conflict_409_across_workers(env):
    key = new_key()
    slow = Background(env.a.port, "POST", "/pay/charge?ms=1500", key, b"{}")
    wait_for(lambda: env.up.count("/pay/charge", key) == 1, "the first request upstream")
    workers = set()
    for _ in range(12):
        r = request(env.a.port, "POST", "/pay/charge?ms=1500", key, b"{}")
        eq(r.status, 409, "a duplicate while the first runs")
        check(int(r.h("retry-after")) >= 1, "Retry-After")
        eq(json.loads(r.body)["status"], 409, "problem status")
        workers.add(r.h("x-worker"))
    check(len(workers) >= 2, f"duplicates answered by both workers: {workers}")
    eq(slow.get().status, 201, "the first request")
    eq(request(env.a.port, "POST", "/pay/charge?ms=1500", key, b"{}").h("idempotent-replayed"),
       "true", "then a replay")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_two_instances_share_redis(env):
    key = new_key()
    slow = Background(env.a.port, "POST", "/pay/charge?ms=1000", key, b"{}")
    wait_for(lambda: env.up.count("/pay/charge", key) == 1, "the first request upstream")
    eq(request(env.b.port, "POST", "/pay/charge?ms=1000", key, b"{}").status, 409,
       "the other nginx while the first runs")
    first = slow.get()
    again = replay(env.b.port, "POST", "/pay/charge?ms=1000", key, b"{}")
    eq(again.h("idempotent-replayed"), "true", "the other nginx replays")
    eq(again.body, first.body, "replayed body")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_scope_keeps_clients_apart(env):
    key = new_key()
    a = pay(env, "/scoped/charge", key, headers={"X-Client": "alice"})
    b = pay(env, "/scoped/charge", key, headers={"X-Client": "bob"})
    check(a.body != b.body, "two clients, two charges")
    eq(replay_pay(env, "/scoped/charge", key, headers={"X-Client": "alice"}).body, a.body,
       "alice's replay")
    eq(env.up.count("/scoped/charge", key), 2, "one arrival per client")


def case_prefix_keeps_locations_apart(env):
    key = new_key()
    pay(env, "/pay/p", key)
    eq(pay(env, "/prefixed/p", key).h("idempotent-replayed"), None,
       "another prefix is another key space")
    eq(replay_pay(env, "/prefixed/p", key).h("idempotent-replayed"), "true", "its own replay")


def case_lease_renewed_while_upstream_runs(env):
    key = new_key()
    slow = Background(env.a.port, "POST", "/renewed/charge", key, AMOUNT_1,
                      headers={"X-Delay-Ms": "3000"})
    wait_for(lambda: env.up.count("/renewed/charge", key) == 1, "the first request upstream")
    time.sleep(1.8)   # past the 1 s lease the claim began with
    eq(pay(env, "/renewed/charge", key).status, 409, "the running request keeps its key")
    first = slow.get()
    eq(first.status, 201, "the first request")
    eq(replay_pay(env, "/renewed/charge", key).body, first.body, "then replays")
    eq(env.up.count("/renewed/charge", key), 1, "upstream arrivals")


def case_upstream_5xx_frees_key(env):
    key = new_key()
    eq(pay(env, "/pay/flaky", key).status, 503, "the upstream fails")
    retry = pay(env, "/pay/flaky", key)
    eq(retry.status, 201, "a retry runs")
    eq(replay_pay(env, "/pay/flaky", key).body, retry.body, "then replays")
    eq(env.up.count("/pay/flaky", key), 2, "upstream arrivals")


def case_connection_failure_frees_key(env):
    key = new_key()
    eq(pay(env, "/down/charge", key).status, 502, "no upstream")
    eq(pay(env, "/down/charge", key).status, 502, "the key was freed: the retry tries again")
    key = new_key()
    eq(pay(env, "/downpage/charge", key).body, b"oops", "error_page's answer")
    eq(pay(env, "/downpage/charge", key).body, b"oops", "freed after an internal redirect too")


def case_upstream_timeout_holds_key(env):
    key = new_key()
    eq(pay(env, "/slowread/timeout", key).status, 504, "the upstream is too slow")
    r = pay(env, "/slowread/timeout", key)
    eq(r.status, 409, "the key is held while its lease lasts")
    check(r.h("retry-after") is not None, "Retry-After")
    eq(env.up.count("/slowread/timeout", key), 1, "upstream arrivals while held")
    time.sleep(3.2)   # lease 2 s from the claim, and the module's 1 s slack
    eq(pay(env, "/slowread/timeout", key).status, 201, "after the lease, a retry runs")
    eq(env.up.count("/slowread/timeout", key), 2, "upstream arrivals")


def case_client_gone_before_response(env):
    key = new_key()
    conn = http.client.HTTPConnection("127.0.0.1", env.a.port, timeout=10)
    conn.request("POST", "/short/gone", AMOUNT_1, {"Idempotency-Key": key, "X-Delay-Ms": "1000"})
    wait_for(lambda: env.up.count("/short/gone", key) == 1, "the request upstream")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    time.sleep(0.3)
    eq(pay(env, "/short/gone", key).status, 409, "the key is held while its lease lasts")
    wait_for(lambda: pay(env, "/short/gone", key).status == 201, "the lease to end", 6)
    eq(env.up.count("/short/gone", key), 2, "one more arrival once the lease ended")


def case_client_gone_mid_response(env):
    key = new_key()
    conn = http.client.HTTPConnection("127.0.0.1", env.a.port, timeout=10)
    conn.request("POST", "/unbuffered/cut", AMOUNT_1, {"Idempotency-Key": key})
    r = conn.getresponse()
    eq(r.status, 200, "the response starts")
    r.read(5)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    time.sleep(0.5)   # nginx finds the client gone, and closes the upstream too
    eq(pay(env, "/unbuffered/cut", key).status, 409, "the key is held while its lease lasts")
    wait_for(lambda: pay(env, "/unbuffered/cut", key).status != 409, "the lease to end", 6)
    eq(env.up.count("/unbuffered/cut", key), 2, "one more arrival once the lease ended")


def case_upstream_cut_mid_response(env):
    key = new_key()
    r = None
    try:
        r = pay(env, "/short/cutoff", key)
    except (http.client.HTTPException, OSError):
        pass
    check(r is None or len(r.body) < 20, "the client cannot get a whole response")
    eq(pay(env, "/short/cutoff", key).status, 409, "the key is held while its lease lasts")
    wait_for(lambda: pay(env, "/short/cutoff", key).status == 201, "the lease to end", 6)
    eq(env.up.count("/short/cutoff", key), 2, "one more arrival once the lease ended")


def case_response_over_limit(env):
    key = new_key()
    first = pay(env, "/pay/big?n=1100000", key)
    eq((first.status, len(first.body)), (200, 1100000), "the first client gets it all")
    again = replay_pay(env, "/pay/big?n=1100000", key)
    eq(again.status, 500, "a replay says it cannot be replayed")
    eq(again.h("idempotent-replayed"), "true", "it is a replay")
    eq(again.h("content-type"), "application/problem+json", "problem document")
    eq(env.up.count("/pay/big", key), 1, "never a second trip upstream")


def case_chunked_and_empty_bodies(env):
    key = new_key()
    first = pay(env, "/pay/chunked", key)
    eq(first.body, b"alpha,beta,gamma", "chunked response")
    again = replay_pay(env, "/pay/chunked", key)
    eq((again.body, again.h("idempotent-replayed")), (first.body, "true"), "chunked replay")

    key = new_key()
    body = json.dumps({"amount": 7}).encode()
    first = request(env.a.port, "POST", "/pay/creq", key, body, chunked=True)
    eq(first.status, 201, "chunked request")
    again = replay(env.a.port, "POST", "/pay/creq", key, body)
    eq(again.h("idempotent-replayed"), "true", "same bytes unchunked: the same request")
    eq(env.up.count("/pay/creq", key), 1, "upstream arrivals")

    for path, status in (("/pay/empty", 204), ("/pay/empty200", 200)):
        key = new_key()
        eq(pay(env, path, key).status, status, path)
        again = replay_pay(env, path, key)
        eq((again.status, again.body, again.h("idempotent-replayed")), (status, b"", "true"),
           f"{path} replay")
        eq(env.up.count(path, key), 1, "upstream arrivals")

    key = new_key()
    eq(request(env.a.port, "POST", "/pay/nobody", key).status, 201, "empty request body")
    eq(replay(env.a.port, "POST", "/pay/nobody", key).h("idempotent-replayed"), "true",
       "empty request body replays")


def case_large_request_body(env):
    # over client_body_buffer_size: nginx keeps it in a file, read in a thread
    key = new_key()
    body = b"y" * 300000
    eq(request(env.a.port, "POST", "/pay/upload", key, body).status, 201, "first")
    eq(replay(env.a.port, "POST", "/pay/upload", key, body).h("idempotent-replayed"), "true",
       "replay")
    eq(request(env.a.port, "POST", "/pay/upload", key, body[:-1] + b"z").status, 422,
       "one byte differs")


def case_reload_mid_request(env):
    key = new_key()
    slow = Background(env.a.port, "POST", "/pay/charge?ms=1500", key, b"{}")
    wait_for(lambda: env.up.count("/pay/charge", key) == 1, "the first request upstream")
    old = set(env.a.workers())
    env.a.reload()
    eq(slow.get().status, 201, "an old worker finishes its request")
    wait_for(lambda: not (old & set(env.a.workers())), "the old workers to exit")
    again = replay(env.a.port, "POST", "/pay/charge?ms=1500", key, b"{}")
    eq(again.h("idempotent-replayed"), "true", "the new workers replay it")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_worker_dies_holding_key(env):
    key = new_key()
    slow = Background(env.a.port, "POST", "/short/charge", key, AMOUNT_1,
                      headers={"X-Delay-Ms": "4000"})
    wait_for(lambda: env.up.count("/short/charge", key) == 1, "the first request upstream")
    for pid in env.a.workers():
        os.kill(pid, signal.SIGKILL)
    slow.join(30)
    check(slow.error is not None, "the client lost its answer")
    wait_port(env.a.port, env.a.proc, "nginx")
    eq(pay(env, "/short/charge", key).status, 409,
       "the dead worker's claim holds until its lease ends")
    wait_for(lambda: pay(env, "/short/charge", key).status == 201, "the lease to end", 6)
    eq(env.up.count("/short/charge", key), 2, "one more arrival once the lease ended")


def case_store_down_then_back(env):
    key = new_key()
    env.c_redis.stop()
    r = pay(env, "/pay/charge", key, port=env.c.port)
    eq(r.status, 503, "the store is down")
    check(r.h("retry-after") is not None, "Retry-After")
    eq(r.h("content-type"), "application/problem+json", "problem document")
    eq(env.up.count("/pay/charge", key), 0, "nothing reached the upstream")
    env.c_redis.start()
    wait_for(lambda: pay(env, "/pay/charge", key, port=env.c.port).status == 201,
             "the store to answer again")
    eq(replay_pay(env, "/pay/charge", key, port=env.c.port).h("idempotent-replayed"), "true",
       "then replays")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_frozen_store_blocks_no_one_else(env):
    key = new_key()
    os.kill(env.c_redis.proc.pid, signal.SIGSTOP)
    try:
        frozen = Background(env.c.port, "POST", "/pay/charge", key, b"{}")
        time.sleep(0.2)
        t = time.monotonic()
        for _ in range(10):
            eq(request(env.c.port, "GET", "/plain/ping").status, 201, "a request without the store")
        took = time.monotonic() - t
        check(took < 1.0, f"10 requests that need no store took {took:.2f} s")
        r = frozen.get()
        eq(r.status, 503, "the request that needs the store, once its timeout passes")
    finally:
        os.kill(env.c_redis.proc.pid, signal.SIGCONT)
    eq(env.up.count("/pay/charge", key), 0, "nothing reached the upstream")


def case_sqlite_as_unprivileged_worker(env):
    key = new_key()
    eq(pay(env, "/pay/charge", key, port=env.s.port).status, 201, "first")
    eq(replay_pay(env, "/pay/charge", key, port=env.s.port).h("idempotent-replayed"), "true",
       "replay")
    db = os.path.join(env.root, "sqlite-data", "idem.db")
    check(os.path.exists(db), "the database file")
    if os.geteuid() == 0:
        eq(pwd.getpwuid(os.stat(db).st_uid).pw_name, "nobody", "owner of the database")


def case_memcached_store(env):
    key = new_key()
    slow = Background(env.m.port, "POST", "/pay/charge", key, AMOUNT_1,
                      headers={"X-Delay-Ms": "800"})
    wait_for(lambda: env.up.count("/pay/charge", key) == 1, "the first request upstream")
    eq(pay(env, "/pay/charge", key, port=env.m.port).status, 409, "a duplicate while it runs")
    first = slow.get()
    again = replay_pay(env, "/pay/charge", key, port=env.m.port)
    eq((again.body, again.h("idempotent-replayed")), (first.body, "true"), "replay")
    eq(env.up.count("/pay/charge", key), 1, "upstream arrivals")


def case_bad_configuration_fails_test(env):
    for name, store, extra, word in (
            ("t-scheme", "nosuch://x", "", "idempotency_store"),
            ("t-unreachable", f"redis://127.0.0.1:{free_port()}?connect_timeout_ms=300", "",
             "idempotency_store"),
            ("t-time", None, "location /t/ { idempotency on; idempotency_lease soon; }",
             "idempotency_lease"),
            ("t-ttl", None, "location /t/ { idempotency on; idempotency_ttl 0; }",
             "idempotency_ttl"),
            ("t-prefix", None, 'location /t/ { idempotency on; idempotency_key_prefix "a:b:"; }',
             "idempotency_key_prefix")):
        store = store or env.a_store
        n = Nginx(env.root, env.module, store, env.up, name, extra=extra)
        r = n.test_config()
        check(r.returncode != 0, f"{name}: nginx -t passed")
        check(word in r.stderr, f"{name}: the message names {word}: {r.stderr}")
    good = Nginx(env.root, env.module, env.a_store, env.up, "t-good").test_config()
    eq(good.returncode, 0, f"a good configuration: {good.stderr}")


CASES = [v for k, v in list(globals().items()) if k.startswith("case_")]


class Env:
    pass


def main():
    module = os.path.abspath(sys.argv[1])
    wanted = sys.argv[2:]
    root = tempfile.mkdtemp(prefix="idem-nginx-")
    env = Env()
    env.root, env.module = root, module
    servers = []
    failed = []
    try:
        env.up = Upstream()
        env.redis = Redis(root)
        servers.append(env.redis)
        env.a_store = env.redis.url()
        env.a = Nginx(root, module, env.a_store, env.up, "a").start()
        servers.append(env.a)
        env.b = Nginx(root, module, env.a_store, env.up, "b").start()
        servers.append(env.b)
        env.c_redis = Redis(root)
        servers.append(env.c_redis)
        # one worker: a blocked event loop could not hide behind another
        env.c = Nginx(root, module, env.c_redis.url(), env.up, "c", workers=1).start()
        servers.append(env.c)
        env.memcached = Memcached()
        servers.append(env.memcached)
        env.m = Nginx(root, module, env.memcached.url(), env.up, "m").start()
        servers.append(env.m)
        env.s = Nginx(root, module, f"sqlite://{root}/sqlite-data/idem.db", env.up, "s").start()
        servers.append(env.s)

        for case in CASES:
            name = case.__name__[5:]
            if wanted and name not in wanted:
                continue
            t = time.monotonic()
            try:
                case(env)
                print(f"ok   {name} ({time.monotonic() - t:.1f} s)", flush=True)
            except Exception:  # noqa: BLE001 - every case runs; failures are listed
                failed.append(name)
                print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    finally:
        for s in reversed(servers):
            s.stop()
        if failed:
            for n in ("a", "b", "c", "m", "s"):
                if hasattr(env, n):
                    print(f"--- error.log of nginx {n} (tail)\n" + getattr(env, n).log()[-3000:])
        shutil.rmtree(root, ignore_errors=True)
    if failed:
        print(f"{len(failed)} failed: {' '.join(failed)}")
        return 1
    print("all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
