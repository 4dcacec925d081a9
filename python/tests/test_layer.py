"""The layer below the seed's examples: races between threads and processes,
fork(), a worker killed in its handler, async functions, the step API,
values that cannot be stored, and errors."""

import asyncio
import os
import signal
import sqlite3
import threading
import time

import pytest

import idempotency


def test_threads_racing_on_one_key_run_it_once(layer):
    runs = []
    start = threading.Barrier(8)
    turned_away = threading.Semaphore(0)

    @layer.handle()
    def charge(idempotency_key):
        runs.append(threading.get_ident())
        # Still running while every other caller gets its answer.
        for _ in range(7):
            turned_away.acquire(timeout=10)
        return "charged"

    results = [None] * 8

    def client(i):
        start.wait()
        results[i] = charge(idempotency_key="race")
        if results[i] != "charged":
            turned_away.release()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1
    assert results.count("charged") == 1
    assert sum(1 for r in results if isinstance(r, dict) and r["status_code"] == 409) == 7
    assert charge(idempotency_key="race") == ("charged", 200)


def test_store_calls_release_the_gil(tmp_path):
    # A store call that waits for SQLite's write lock, held here by another
    # connection: with the GIL released this thread runs on meanwhile and
    # sees the call still waiting; with it held, it would only run again
    # once the call had given up.
    db = tmp_path / "gil.db"
    layer = idempotency.IdempotencyLayer(f"sqlite://{db}?busy_timeout_ms=5000")
    layer.begin("warm-up").commit(200, b"")
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    got = []
    t = threading.Thread(target=lambda: got.append(layer.begin("waits")))
    t.start()
    time.sleep(0.3)
    waiting = t.is_alive()
    lock.execute("COMMIT")
    t.join()
    assert waiting and isinstance(got[0], idempotency.Claim)
    got[0].commit(200, b"")


def _fork(fn):
    """Run fn() in a child process; its exit status is 0 when fn returned."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _wait(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_processes_racing_on_one_key_run_it_once(layer, tmp_path):
    # The layer is opened here, before fork(): every child opens its own store.
    log = tmp_path / "runs"
    go = tmp_path / "go"

    @layer.handle()
    def charge(idempotency_key):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)
        return "charged"

    def child():
        while not go.exists():
            time.sleep(0.001)
        r = charge(idempotency_key="race")
        # A child that starts late may find the work done already.
        assert r in ("charged", ("charged", 200)) or r["status_code"] == 409

    pids = [_fork(child) for _ in range(6)]
    go.touch()
    assert [_wait(pid) for pid in pids] == [0] * 6
    assert len(log.read_text().split()) == 1
    # The parent's own store still works after its children used theirs.
    assert charge(idempotency_key="race") == ("charged", 200)


def test_a_child_uses_a_layer_opened_before_fork(layer):
    @layer.handle()
    def f(idempotency_key):
        return os.getpid()

    parent = f(idempotency_key="before")

    def child():
        assert f(idempotency_key="before") == (parent, 200)
        assert f(idempotency_key="in-child") == os.getpid()

    assert _wait(_fork(child)) == 0
    assert f(idempotency_key="in-child")[1] == 200


def test_a_worker_killed_in_its_handler_blocks_its_key_for_one_lease(make_layer):
    layer = make_layer(lease_ms=1500)
    r, w = os.pipe()

    hang = [True]  # in the child; the parent's takeover returns at once

    @layer.handle()
    def charge(idempotency_key):
        if hang[0]:
            os.write(w, b"x")
            time.sleep(60)
        return "taken over"

    pid = _fork(lambda: charge(idempotency_key="crash"))
    hang[0] = False
    assert os.read(r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)

    busy = charge(idempotency_key="crash")
    assert busy["status_code"] == 409 and busy["retry_after"] <= 2
    time.sleep(1.7)
    assert charge(idempotency_key="crash") == "taken over"
    assert charge(idempotency_key="crash") == ("taken over", 200)


def test_async_functions(layer):
    runs = []
    turned_away = []
    released = asyncio.Event()

    @layer.handle()
    async def charge(idempotency_key, amount):
        runs.append(amount)
        if amount < 0:
            raise ValueError("negative")
        if not released.is_set():  # still running while the others get their answers
            await asyncio.wait_for(released.wait(), 10)
        return {"amount": amount}

    async def client():
        r = await charge(idempotency_key="a", amount=1)
        if "status_code" in r:
            turned_away.append(r)
            if len(turned_away) == 2:
                released.set()
        return r

    async def scenario():
        together = await asyncio.gather(client(), client(), client())
        assert together.count({"amount": 1}) == 1
        assert [r["status_code"] for r in turned_away] == [409, 409]
        assert await charge(idempotency_key="a", amount=1) == ({"amount": 1}, 200)
        assert (await charge(idempotency_key="a", amount=2))["status_code"] == 422
        with pytest.raises(ValueError):
            await charge(idempotency_key="b", amount=-1)
        with pytest.raises(ValueError):  # freed: it runs again
            await charge(idempotency_key="b", amount=-1)

    asyncio.run(scenario())
    assert runs == [1, -1, -1]


def test_a_value_that_is_not_json_is_stored_as_a_500_record(layer):
    runs = []

    @layer.handle()
    def f(idempotency_key):
        runs.append(1)
        return {1, 2}

    with pytest.raises(idempotency.ResultNotStorable) as e:
        f(idempotency_key="set")
    assert e.value.value == {1, 2} and isinstance(e.value, TypeError)
    # The work was done: it is not run again.
    record, status = f(idempotency_key="set")
    assert status == 500 and record["status_code"] == 500 and "set" in record["message"]
    assert runs == [1]


def test_a_value_over_max_response_len_is_stored_as_a_500_record(make_layer):
    layer = make_layer(max_response_len=1000)

    @layer.handle()
    def f(idempotency_key):
        return "x" * 2000

    with pytest.raises(idempotency.ResultNotStorable):
        f(idempotency_key="big")
    record, status = f(idempotency_key="big")
    assert status == 500 and record["status_code"] == 500

    tiny = make_layer(max_response_len=8, key_prefix="tiny" + layer.options["key_prefix"])
    g = tiny.handle()(f.__wrapped__)
    with pytest.raises(idempotency.ResultNotStorable):
        g(idempotency_key="big")
    assert g(idempotency_key="big") == (None, 500)  # even the record was too large


def test_arguments_that_are_not_json_need_a_fingerprint(layer):
    @layer.handle()
    def f(idempotency_key, thing):
        return "ran"

    with pytest.raises(TypeError, match="fingerprint"):
        f(idempotency_key="k", thing=object())

    @layer.handle(fingerprint=lambda idempotency_key, thing: type(thing).__name__)
    def g(idempotency_key, thing):
        return "ran"

    assert g(idempotency_key="k2", thing=object()) == "ran"
    assert g(idempotency_key="k2", thing=object()) == ("ran", 200)
    assert g(idempotency_key="k2", thing=1)["status_code"] == 422


def test_step_api(make_layer):
    layer = make_layer(lease_ms=1000)
    claim = layer.begin("step", b"fp")
    assert isinstance(claim, idempotency.Claim) and claim.held
    busy = layer.begin("step", b"fp")
    assert busy.outcome == idempotency.IN_PROGRESS and 0 < busy.retry_after_ms <= 1000
    claim.extend(1000)
    claim.commit(201, b'{"id": 1}', [("Location", "/payments/1")])
    assert not claim.held
    with pytest.raises(idempotency.IdempotencyError):
        claim.commit(201, b"")
    replay = layer.begin("step", b"fp")
    assert (replay.outcome, replay.status, replay.body) == (idempotency.REPLAYED, 201, b'{"id": 1}')
    assert replay.headers == [("Location", "/payments/1")]
    assert layer.begin("step", b"other").outcome == idempotency.MISMATCH

    layer.begin("aborted").abort()
    layer.begin("aborted").commit(200, b"")


def test_a_claim_taken_over_is_lost(make_layer):
    layer = make_layer(lease_ms=300)
    old = layer.begin("slow")
    time.sleep(0.5)
    new = layer.begin("slow")
    with pytest.raises(idempotency.ClaimLost) as e:
        old.commit(200, b"late")
    assert e.value.code == -4 and str(e.value)
    new.commit(200, b"in time")
    assert layer.begin("slow").body == b"in time"


def test_errors_carry_the_librarys_message(url, prefix):
    with pytest.raises(idempotency.InvalidArgument, match="lease_ms"):
        idempotency.IdempotencyLayer(url, key_prefix=prefix, lease_ms=0)
    with pytest.raises(idempotency.InvalidArgument) as e:
        idempotency.IdempotencyLayer("nosuch://x")
    assert "nosuch" in str(e.value) and e.value.code == -1
    # a store that cannot open, with any set of drivers built in
    with pytest.raises(idempotency.BackendError, match="/dev/null/idem.db"):
        idempotency.IdempotencyLayer("sqlite:///dev/null/idem.db")
    layer = idempotency.IdempotencyLayer(url, key_prefix=prefix, max_key_len=8)
    with pytest.raises(idempotency.InvalidArgument):
        layer.begin("123456789")
    with pytest.raises(TypeError):
        idempotency.IdempotencyLayer(url, no_such_option=1)


def test_options_as_keyword_arguments(make_layer):
    layer = make_layer(lease_ms=5000, ttl_s=60, cache_bytes=1 << 20, auto_extend=True,
                       commit_timeout_ms=2000, max_response_len=1 << 16)

    @layer.handle()
    def f(idempotency_key):
        return 1

    assert f(idempotency_key="o") == 1
    assert f(idempotency_key="o") == (1, 200)
    assert f(idempotency_key="o") == (1, 200)
    stats = layer.stats()
    assert stats["executed"] == 1 and stats["replayed"] + stats["cache_hits"] >= 1


def test_a_function_that_outran_its_lease_returns_its_value_unstored(make_layer, caplog):
    layer = make_layer(lease_ms=300)
    slow = [True]
    inside = threading.Event()
    taken_over = threading.Event()

    @layer.handle()
    def f(idempotency_key):
        if slow[0]:
            slow[0] = False
            inside.set()
            taken_over.wait(10)
            return "late"
        return "in time"

    late = []
    t = threading.Thread(target=lambda: late.append(f(idempotency_key="outrun")))
    t.start()
    assert inside.wait(10)
    time.sleep(0.45)  # past the 300 ms lease
    try:
        assert f(idempotency_key="outrun") == "in time"  # took the key over
    finally:
        taken_over.set()
        t.join()
    assert late == ["late"]
    assert any("outrun" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert f(idempotency_key="outrun") == ("in time", 200)


def test_exception_classes():
    assert issubclass(idempotency.BackendError, idempotency.IdempotencyError)
    assert issubclass(idempotency.InvalidArgument, ValueError)
    assert issubclass(idempotency.MissingKey, idempotency.InvalidArgument)
    assert issubclass(idempotency.ResultNotStorable, TypeError)
    assert idempotency.IdempotencyError.__module__ == "idempotency"


def test_checkpoints_let_a_retry_resume_after_a_failure(layer):
    seen = []

    @layer.handle()
    def pay(idempotency_key, amount):
        done = idempotency.last_checkpoint()
        seen.append((done, idempotency.subkey("charge")))
        if done is None:
            # The card processor charged, under a subkey it deduplicates
            # on; then this process failed before answering.
            idempotency.checkpoint("charged", {"charge": "ch_1", "amount": amount})
            raise ConnectionError("lost the answer")
        return {"charge": done[1]["charge"]}

    with pytest.raises(ConnectionError):
        pay(idempotency_key="order-7", amount=40)
    assert pay(idempotency_key="order-7", amount=40) == {"charge": "ch_1"}
    assert pay(idempotency_key="order-7", amount=40) == ({"charge": "ch_1"}, 200)
    assert seen[0][0] is None
    assert seen[1][0] == ("charged", {"charge": "ch_1", "amount": 40})
    assert seen[0][1] == seen[1][1] and len(seen[0][1]) == 64  # one subkey for every holder


def test_a_worker_killed_after_a_checkpoint_is_resumed_from_it(make_layer):
    layer = make_layer(lease_ms=1000)
    r, w = os.pipe()
    hang = [True]

    @layer.handle()
    def pay(idempotency_key):
        if hang[0]:
            idempotency.checkpoint("charged", {"subkey": idempotency.subkey("charge")})
            os.write(w, b"x")
            time.sleep(60)
        return idempotency.last_checkpoint()

    pid = _fork(lambda: pay(idempotency_key="crash-cp"))
    hang[0] = False
    assert os.read(r, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    time.sleep(1.2)
    name, value = pay(idempotency_key="crash-cp")
    assert name == "charged" and len(value["subkey"]) == 64


def test_step_api_checkpoints_and_subkeys(make_layer):
    layer = make_layer(lease_ms=1000, subkey_secret="s3cret")
    claim = layer.begin("steps")
    assert claim.last_checkpoint is None
    sub = claim.subkey("charge")
    assert sub != claim.subkey("refund")
    claim.checkpoint("charged", b"\x00raw")
    assert claim.last_checkpoint == ("charged", b"\x00raw")
    claim.abort()  # keeps the checkpoint for the next holder
    again = layer.begin("steps")
    assert again.last_checkpoint == ("charged", b"\x00raw") and again.subkey("charge") == sub
    again.commit(200, b"")
    other = make_layer(subkey_secret="other").begin("steps2")
    assert other.subkey("charge") != sub
    other.abort()


def test_checkpoint_outside_a_decorated_call_is_an_error():
    with pytest.raises(idempotency.IdempotencyError, match="decorated"):
        idempotency.checkpoint("x")
