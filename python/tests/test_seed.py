"""Every line of the seed's README, on the store under test."""

import os
import subprocess
import sys
import threading
import time

import pytest

import idempotency
from idempotency import IdempotencyLayer


def test_basic_usage_processes_then_returns_cached(layer):
    charged = []

    @layer.handle()  # Looks for 'idempotency_key' in kwargs
    def process_payment(idempotency_key, amount):
        charged.append(amount)
        return {"status": "success", "amount": amount, "ref": "PAY-123"}

    first = process_payment(idempotency_key="req-123", amount=100)  # Processes
    again = process_payment(idempotency_key="req-123", amount=100)  # Returns cached
    assert first == {"status": "success", "amount": 100, "ref": "PAY-123"}
    assert again == ({"status": "success", "amount": 100, "ref": "PAY-123"}, 200)
    assert charged == [100]


def test_response_format_keeps_the_key_order(layer):
    @layer.handle()
    def process_payment(idempotency_key, amount):
        return {"status": "success", "amount": amount, "ref": "PAY-123"}

    process_payment(idempotency_key="req-123", amount=100)
    value, status = process_payment(idempotency_key="req-123", amount=100)
    assert list(value) == ["status", "amount", "ref"] and status == 200


def test_custom_key_generation(layer):
    done = []

    @layer.handle(key_func=lambda *args, **kwargs: f"user:{kwargs['user_id']}:{kwargs['action']}")
    def user_action(user_id, action):
        # This will be idempotent per user-action combination
        done.append((user_id, action))
        return {"user": user_id, "action": action}

    assert user_action(user_id=7, action="upgrade") == {"user": 7, "action": "upgrade"}
    assert user_action(user_id=7, action="upgrade") == ({"user": 7, "action": "upgrade"}, 200)
    assert user_action(user_id=7, action="cancel") == {"user": 7, "action": "cancel"}
    assert user_action(user_id=8, action="upgrade") == {"user": 8, "action": "upgrade"}
    assert done == [(7, "upgrade"), (7, "cancel"), (8, "upgrade")]


def test_duplicate_while_processing_is_the_409_dict(layer):
    inside = threading.Event()
    release = threading.Event()

    @layer.handle()
    def process_payment(idempotency_key, amount):
        inside.set()
        release.wait(10)
        return {"status": "success", "amount": amount, "ref": "PAY-123"}

    first = []
    t = threading.Thread(target=lambda: first.append(process_payment(idempotency_key="req-123", amount=100)))
    t.start()
    assert inside.wait(10)
    try:
        busy = process_payment(idempotency_key="req-123", amount=100)
    finally:
        release.set()
        t.join()
    assert set(busy) == {"error", "status_code", "retry_after", "message"}
    assert busy["error"] == "Request currently processing"
    assert busy["status_code"] == 409
    assert isinstance(busy["retry_after"], int) and 1 <= busy["retry_after"] <= 60  # seconds
    assert busy["message"] == "Request with key req-123 is being processed"
    assert first == [{"status": "success", "amount": 100, "ref": "PAY-123"}]


def test_failure_clears_the_key_so_the_client_can_retry(layer):
    calls = []

    @layer.handle()
    def process_payment(idempotency_key, amount):
        calls.append(amount)
        if len(calls) == 1:
            raise ConnectionError("card processor unreachable")
        return {"status": "success", "amount": amount}

    with pytest.raises(ConnectionError, match="unreachable"):
        process_payment(idempotency_key="req-9", amount=5)
    assert process_payment(idempotency_key="req-9", amount=5) == {"status": "success", "amount": 5}
    assert process_payment(idempotency_key="req-9", amount=5) == ({"status": "success", "amount": 5}, 200)
    assert calls == [5, 5]


def test_self_cleaning_ttl(make_layer):
    # The seed's 24-hour TTL is the default; ttl_s shortens it.
    layer = make_layer(ttl_s=1)
    calls = []

    @layer.handle()
    def f(idempotency_key):
        calls.append(1)
        return len(calls)

    assert f(idempotency_key="k") == 1
    assert f(idempotency_key="k") == (1, 200)
    time.sleep(2.2)
    assert f(idempotency_key="k") == 2


def test_same_key_with_other_arguments_is_422(layer):
    @layer.handle()
    def process_payment(idempotency_key, amount):
        return {"amount": amount}

    process_payment(idempotency_key="req-123", amount=100)
    other = process_payment(idempotency_key="req-123", amount=999)
    assert other["status_code"] == 422
    assert "req-123" in other["message"]
    assert process_payment(idempotency_key="req-123", amount=100) == ({"amount": 100}, 200)


def test_a_call_without_a_key_runs_nothing(layer):
    calls = []

    @layer.handle()
    def process_payment(amount, idempotency_key=None):
        calls.append(amount)

    with pytest.raises(idempotency.MissingKey):
        process_payment(amount=1)
    with pytest.raises(idempotency.MissingKey):
        process_payment(amount=1, idempotency_key="")
    with pytest.raises(ValueError):  # MissingKey is a ValueError too
        process_payment(amount=1, idempotency_key=None)
    assert calls == []


def test_default_store_is_idempotency_url(monkeypatch, url, prefix):
    monkeypatch.setenv("IDEMPOTENCY_URL", url)
    layer = IdempotencyLayer(key_prefix=prefix)
    assert layer.url == url


def test_default_store_without_url_is_an_sqlite_file(monkeypatch, tmp_path, prefix):
    monkeypatch.delenv("IDEMPOTENCY_URL", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    layer = IdempotencyLayer(key_prefix=prefix)
    assert layer.backend == "sqlite"
    assert layer.url == f"sqlite://{tmp_path}/idempotency/idempotency.db"

    @layer.handle()
    def f(idempotency_key):
        return "done"

    assert f(idempotency_key="a") == "done"
    assert (tmp_path / "idempotency" / "idempotency.db").exists()
    # A second layer (another process would do the same) replays it.
    assert IdempotencyLayer(key_prefix=prefix).handle()(f.__wrapped__)(idempotency_key="a") == ("done", 200)


def test_payment_demo_prints_the_seeds_output(url):
    expected = """\
Request 1: Sending...
---  Processing payment of $100 ---
Response 1: {'status': 'success', 'amount': 100, 'ref': 'PAY-123'}

Request 2: Sending duplicate...
Response 2: ({'status': 'success', 'amount': 100, 'ref': 'PAY-123'}, 200)

Request 3: Different idempotency key...
---  Processing payment of $200 ---
Response 3: {'status': 'success', 'amount': 200, 'ref': 'PAY-123'}

"""
    conflict = ("409 Conflict: {'error': 'Request currently processing', 'status_code': 409, "
                "'retry_after': 60, 'message': 'Request with key req-456 is being processed'}")
    demo = os.environ["IDEMPOTENCY_DEMO"]
    out = subprocess.run([sys.executable, demo, "--url", url], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith(expected)
    rest = out[len(expected):].splitlines()
    assert rest == [
        "Requests 4-6: 3 simultaneous requests with key req-456...",
        "---  Processing payment of $300 ---",
        "Processed: {'status': 'success', 'amount': 300, 'ref': 'PAY-123'}",
        conflict,
        conflict,
    ]
