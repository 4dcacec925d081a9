#!/usr/bin/env python3
"""Requests per second and latency through nginx with the module, beside
nginx alone, in front of the same upstream, with wrk.

    nginx/bench/run.py build/nginx/ngx_http_idempotency_module.so [SECONDS] [STORE ...]

STORE is redis (a redis-server started here) or sqlite (a file in a
temporary directory); default both. The upstream is a server of the same
nginx that answers 201 with a small JSON body, so that the figures show
what the module adds, not what an application costs. For each store and
each of 1 and 16 connections:

    proxy     nginx alone: proxy_pass to the upstream
    new keys  the module: every request a new key (claim, upstream, commit)
    replays   the module: one key, answered from the store (no upstream)

Figures only: nothing is asserted. Servers are stopped by PID.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_module import NGINX, Redis, free_port, started, stop  # noqa: E402

WRK = shutil.which("wrk") or "/usr/bin/wrk"

# Each request gets a key of its own: the run's tag, the wrk thread's number
# (the global id, set in each thread by setup()) and a counter.
NEW_KEYS_LUA = """
local counter = 0
local ids = 0
function setup(thread)
  ids = ids + 1
  thread:set("id", ids)
end
function request()
  counter = counter + 1
  return wrk.format("POST", nil, {["Idempotency-Key"] = "TAG-" .. id .. "-" .. counter,
                                  ["Content-Type"] = "application/json"}, '{"amount": 1250}')
end
"""

REPLAY_LUA = """
function request()
  return wrk.format("POST", nil, {["Idempotency-Key"] = "bench-replay",
                                  ["Content-Type"] = "application/json"}, '{"amount": 1250}')
end
"""


def nginx_conf(prefix, module, store, port, up_port):
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    tmp = os.path.join(prefix, "tmp")
    return f"""
load_module {module};
{user}
worker_processes 1;
error_log logs/error.log warn;
pid logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    idempotency_store {store};
    upstream up {{ server 127.0.0.1:{up_port}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{up_port};
        location / {{
            default_type application/json;
            return 201 '{{"id":"pay_1","amount":1250}}';
        }}
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        location /proxy {{ proxy_pass http://up; }}
        location /idem {{ idempotency on; idempotency_key_prefix "bench-{port}:";
                         proxy_pass http://up; }}
    }}
}}
"""


def wrk(url, conns, seconds, lua):
    script = os.path.join(tempfile.gettempdir(), f"idem-bench-{os.getpid()}.lua")
    with open(script, "w") as f:
        f.write(lua)
    threads = min(conns, 2)
    out = subprocess.run([WRK, "-t", str(threads), "-c", str(conns), "-d", f"{seconds}s",
                          "--latency", "-s", script, url],
                         capture_output=True, text=True, check=True).stdout
    os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rps, lat.get("50", "?"), lat.get("99", "?"), int(errors.group(1)) if errors else 0


def run_store(root, module, name, seconds):
    servers = []
    try:
        if name == "redis":
            redis = Redis(root)
            servers.append(redis)
            url = f"redis://127.0.0.1:{redis.port}"
        else:
            url = f"sqlite://{root}/sqlite/bench.db"
        prefix = os.path.join(root, f"nginx-{name}")
        for d in ("logs", "tmp", "conf"):
            os.makedirs(os.path.join(prefix, d), exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(prefix, 0o755)
        port, up_port = free_port(), free_port()
        conf = os.path.join(prefix, "conf", "nginx.conf")
        with open(conf, "w") as f:
            f.write(nginx_conf(prefix, module, url, port, up_port))
        proc = subprocess.Popen([NGINX, "-p", prefix, "-c", conf, "-g", "daemon off;"])
        servers.append(type("N", (), {"stop": lambda self: stop(proc, signal.SIGQUIT)})())
        started(proc, port, "nginx")

        base = f"http://127.0.0.1:{port}"
        for conns in (1, 16):
            for label, path, lua in (("proxy", "/proxy", NEW_KEYS_LUA),
                                     ("new keys", "/idem", NEW_KEYS_LUA),
                                     ("replays", "/idem", REPLAY_LUA)):
                lua = lua.replace("TAG", f"bench-{conns}")
                rps, p50, p99, errors = wrk(base + path, conns, seconds, lua)
                note = f"  ({errors} non-2xx)" if errors else ""
                print(f"{name:7} {conns:>5} {label:9} {rps:>10.0f} {p50:>9} {p99:>9}{note}",
                      flush=True)
    finally:
        for s in reversed(servers):
            s.stop()


def main():
    module = os.path.abspath(sys.argv[1])
    seconds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    stores = sys.argv[3:] or ["redis", "sqlite"]
    root = tempfile.mkdtemp(prefix="idem-nginx-bench-")
    print(f"{'store':7} {'conns':>5} {'what':9} {'req/s':>10} {'p50':>9} {'p99':>9}")
    try:
        for name in stores:
            run_store(root, module, name, seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
