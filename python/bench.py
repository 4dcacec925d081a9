#!/usr/bin/env python3
"""The decorator on Redis beside the seed's design written plainly with redis-py.

    python3 python/bench.py [--url redis://127.0.0.1:PORT] [--seconds S] [--rounds N]
                            [--c-bench build/bench/idem_bench]

Without --url a redis-server is started on a free 127.0.0.1 port in a
temporary directory and stopped by PID. Both sides run on that one server in
the same run, at 1 and 4 threads and 4 processes:

  new      a new key each call: the function runs once and its value is stored
  replay   keys already completed: the stored value comes back

The seed's design is SET NX of a STARTED marker, the function, SET of the
value (2 round trips for a new key), and for a duplicate SET NX then GET (2
round trips). The library claims and returns the existing record in one
round trip, and commits in one. With --c-bench, the C library's own
benchmark on the same Redis, and the decorator's cost per call beside it.
Last, the cost per call on memory:// (no store round trip) of the decorator
and of the extension's begin/commit alone. Figures only: nothing here
asserts a speed.
"""

import argparse
import csv
import json
import os
import multiprocessing
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import redis

from idempotency import IdempotencyLayer

TTL_S = 86400


def seed_handle(client, prefix):
    """The seed's decorator, as its README describes it, on redis-py."""
    def decorate(fn):
        def wrapper(idempotency_key, **kwargs):
            key = prefix + idempotency_key
            if client.set(key, "STARTED", nx=True, ex=TTL_S):
                try:
                    value = fn(idempotency_key=idempotency_key, **kwargs)
                except Exception:
                    client.delete(key)
                    raise
                client.set(key, json.dumps(value), ex=TTL_S)
                return value
            stored = client.get(key)
            if stored == b"STARTED":
                return {"error": "Request currently processing", "status_code": 409,
                        "retry_after": client.ttl(key),
                        "message": f"Request with key {idempotency_key} is being processed"}
            return json.loads(stored), 200
        return wrapper
    return decorate


def payment(idempotency_key, amount):
    return {"status": "success", "amount": amount, "ref": "PAY-123"}


def make_call(kind, url, prefix):
    if kind == "seed":
        client = redis.Redis.from_url(url)
        return seed_handle(client, prefix)(payment)
    return IdempotencyLayer(url, key_prefix=prefix).handle()(payment)


POOL = 2000  # completed keys per worker that the replay path cycles over


def run_worker(kind, url, prefix, path, seconds, counts, w):
    """Call for `seconds`; counts[w] = calls made. Keys are made in the loop
    on both sides alike."""
    call = make_call(kind, url, prefix)
    n = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        call(idempotency_key=f"w{w}-{n % POOL if path == 'replay' else n}", amount=100)
        n += 1
    counts[w] = n


def measure(kind, url, path, mode, workers, seconds):
    """Calls per second of one configuration."""
    prefix = f"b{uuid.uuid4().hex[:10]}:"
    if path == "replay":
        call = make_call(kind, url, prefix)
        for w in range(workers):
            for j in range(POOL):
                call(idempotency_key=f"w{w}-{j}", amount=100)
    if mode == "threads":
        counts = [0] * workers
        runners = [threading.Thread(target=run_worker, args=(kind, url, prefix, path, seconds, counts, w))
                   for w in range(workers)]
    else:
        ctx = multiprocessing.get_context("fork")
        counts = ctx.Array("q", workers)
        runners = [ctx.Process(target=run_worker, args=(kind, url, prefix, path, seconds, counts, w))
                   for w in range(workers)]
    start = time.perf_counter()
    for r in runners:
        r.start()
    for r in runners:
        r.join()
    return sum(counts) / (time.perf_counter() - start)


def own_cost_us(calls):
    """Microseconds per call on memory://: decorator, and begin/commit alone."""
    layer = IdempotencyLayer(f"memory://bench-{uuid.uuid4().hex}")
    decorated = layer.handle()(payment)
    body = json.dumps(payment("k", 100)).encode()
    out = {}
    start = time.perf_counter()
    for i in range(calls):
        decorated(idempotency_key=f"d{i}", amount=100)
    out["decorator new"] = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for i in range(calls):
        decorated(idempotency_key=f"d{i}", amount=100)
    out["decorator replay"] = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for i in range(calls):
        layer.begin(f"s{i}").commit(200, body)
    out["begin+commit new"] = (time.perf_counter() - start) / calls * 1e6
    start = time.perf_counter()
    for i in range(calls):
        layer.begin(f"s{i}")
    out["begin replay"] = (time.perf_counter() - start) / calls * 1e6
    return out


def c_library_beside(idem_bench, url, seconds, decorator):
    """The C library on the same Redis (bench/idem_bench), beside the
    decorator. The decorator's own cost per call is measured apart, on
    memory:// (below): on a shared machine the difference of two rates
    over a network round trip is mostly noise."""
    with tempfile.TemporaryDirectory() as d:
        csv_path = os.path.join(d, "c.csv")
        subprocess.run([idem_bench, "--only", "redis", "--paths", "new,replay", "--conc", "1t,4t",
                        "--seconds", str(seconds), "--rounds", "2", "--url", f"redis={url}",
                        "--csv", csv_path], check=True, stdout=subprocess.DEVNULL)
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["backend"] == "redis" and r["side"] == "lib"]
    print()
    print("the C library (bench/idem_bench) on the same Redis, calls/s")
    print(f"{'path':8} {'concurrency':12} {'C library':>10} {'decorator':>10} {'ratio':>6}")
    for r in rows:
        dec = decorator.get((r["path"], r["conc"]))
        if dec is None:
            continue
        c_rate = float(r["ops_per_s"])
        workers = int(r["conc"][:-1])
        conc = f"{workers} threads" if workers > 1 else "1 thread"
        print(f"{r['path']:8} {conc:12} {c_rate:10.0f} {dec:10.0f} {dec / c_rate:5.2f}x")


def start_redis():
    """A redis-server on a free loopback port: (url, process, directory)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="idem-pybench-")
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return url, proc, directory
        except redis.ConnectionError:
            time.sleep(0.025)
    proc.kill()
    proc.wait()
    raise SystemExit("bench: redis-server did not start")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a Redis to use (default: start one)")
    parser.add_argument("--seconds", type=float, default=1.0, help="per round (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (default 3)")
    parser.add_argument("--c-bench", metavar="IDEM_BENCH",
                        help="also run the C library's benchmark (build/bench/idem_bench) on the same Redis")
    args = parser.parse_args()
    proc = directory = None
    url = args.url
    if url is None:
        url, proc, directory = start_redis()
    try:
        print(f"Redis at {url}; best of {args.rounds} rounds of {args.seconds:g} s; calls/s")
        print(f"{'path':8} {'concurrency':12} {'seed (redis-py)':>16} {'decorator':>10} {'ratio':>6}")
        decorator = {}
        for path in ("new", "replay"):
            for mode, workers in (("threads", 1), ("threads", 4), ("processes", 4)):
                # Alternating rounds, the best of each side: the machine's
                # other load then costs both sides alike.
                seed = lib = 0.0
                for _ in range(args.rounds):
                    seed = max(seed, measure("seed", url, path, mode, workers, args.seconds))
                    lib = max(lib, measure("lib", url, path, mode, workers, args.seconds))
                conc = f"{workers} {mode}" if workers > 1 else "1 thread"
                print(f"{path:8} {conc:12} {seed:16.0f} {lib:10.0f} {lib / seed:5.2f}x", flush=True)
                decorator[path, f"{workers}{mode[0]}"] = lib
        if args.c_bench:
            c_library_beside(args.c_bench, url, args.seconds, decorator)
        print()
        print("cost per call on memory:// (no round trip), microseconds")
        for name, us in own_cost_us(20000).items():
            print(f"  {name:18} {us:6.1f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
