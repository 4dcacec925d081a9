#!/usr/bin/env python3
"""The seed's payment demo on libidempotency.

    python3 payment_demo.py [--url URL]

Without --url the layer uses $IDEMPOTENCY_URL, else an SQLite file in
~/.local/state/idempotency: no server needed. Each run keeps its keys under
a key prefix of its own, so that a second run on the same store charges
again instead of replaying the first run's payments.
"""

import argparse
import threading
import time
import uuid

from idempotency import IdempotencyLayer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="store URL (default: $IDEMPOTENCY_URL, else an SQLite file)")
    args = parser.parse_args()
    layer = IdempotencyLayer(args.url, key_prefix=f"demo-{uuid.uuid4().hex[:12]}:")

    @layer.handle()
    def process_payment(idempotency_key, amount, delay=0.0):
        print(f"---  Processing payment of ${amount} ---", flush=True)
        time.sleep(delay)
        return {"status": "success", "amount": amount, "ref": "PAY-123"}

    print("Request 1: Sending...")
    print(f"Response 1: {process_payment(idempotency_key='req-123', amount=100)}")
    print()
    print("Request 2: Sending duplicate...")
    print(f"Response 2: {process_payment(idempotency_key='req-123', amount=100)}")
    print()
    print("Request 3: Different idempotency key...")
    print(f"Response 3: {process_payment(idempotency_key='req-124', amount=200)}")
    print()

    # Three simultaneous requests with one key: one charges, while it runs
    # the two others get 409.
    print("Requests 4-6: 3 simultaneous requests with key req-456...", flush=True)
    start = threading.Barrier(3)
    responses = [None] * 3

    def client(i):
        start.wait()
        responses[i] = process_payment(idempotency_key="req-456", amount=300, delay=1.0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in sorted(responses, key=lambda r: r.get("status_code", 200)):
        label = "409 Conflict" if r.get("status_code") == 409 else "Processed"
        print(f"{label}: {r}")


if __name__ == "__main__":
    main()
