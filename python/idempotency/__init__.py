"""Run a function once per idempotency key, over libidempotency's stores.

    from idempotency import IdempotencyLayer

    layer = IdempotencyLayer()          # $IDEMPOTENCY_URL, else an SQLite file

    @layer.handle()                     # the key is the idempotency_key argument
    def process_payment(idempotency_key, amount):
        return charge_customer(amount)

The first call returns the function's value; a later call with the same key
returns ``(value, 200)`` without running it; a call while the first still
runs returns a 409 dict; the same key with other arguments a 422 dict. An
exception frees the key and propagates. See python/README.md.
"""

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import math
import os
import pkgutil

# In the build tree the extension module is built apart from these sources
# (PYTHONPATH names both directories); installed, they share one directory
# and this changes nothing.
__path__ = pkgutil.extend_path(__path__, __name__)

from . import _idempotency as _c  # noqa: E402
from ._idempotency import (  # noqa: E402,F401
    BackendError,
    Claim,
    ClaimLost,
    CorruptRecord,
    IdempotencyError,
    InvalidArgument,
    Reply,
    ResponseTooLarge,
    Unsupported,
)

EXECUTED = _c.EXECUTED
REPLAYED = _c.REPLAYED
IN_PROGRESS = _c.IN_PROGRESS
MISMATCH = _c.MISMATCH

__all__ = [
    "IdempotencyLayer", "default_url", "IdempotencyError", "InvalidArgument", "MissingKey",
    "BackendError", "ClaimLost", "CorruptRecord", "ResponseTooLarge", "ResultNotStorable",
    "Unsupported", "Claim", "Reply", "REPLAYED", "IN_PROGRESS", "MISMATCH",
    "IdempotencyMiddleware", "IdempotencyASGIMiddleware", "checkpoint", "last_checkpoint", "subkey",
]

log = logging.getLogger("idempotency")


class MissingKey(InvalidArgument):
    """A decorated function was called without an idempotency key.

    Raised before anything runs: a call the layer cannot protect is refused,
    never run unprotected."""


class ResultNotStorable(IdempotencyError, TypeError):
    """The function ran, but its value cannot be stored (not JSON, or over
    max_response_len).

    The work is done, so the key is not freed for a retry to do it again:
    the layer stores a 500 record in its place, which later calls with the
    key replay. ``value`` holds what the function returned."""

    def __init__(self, message, value):
        super().__init__(message)
        self.value = value


def default_url():
    """The store used when IdempotencyLayer() gets no URL.

    ``$IDEMPOTENCY_URL`` when set; otherwise an SQLite file in the user's
    state directory, ``$XDG_STATE_HOME/idempotency/idempotency.db``
    (``~/.local/state/idempotency/idempotency.db`` by default): it needs no
    server, keeps keys across restarts, and is shared by every process of
    the user on this host."""
    url = os.environ.get("IDEMPOTENCY_URL")
    if url:
        return url
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    directory = os.path.join(os.path.abspath(state), "idempotency")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return "sqlite://" + os.path.join(directory, "idempotency.db")


def _key_bytes(key):
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    raise TypeError(f"an idempotency key must be str or bytes, not {type(key).__name__}")


def _key_text(key):
    return key if isinstance(key, str) else bytes(key).decode("utf-8", "backslashreplace")


# Made once: json.dumps() with options builds an encoder on every call.
_canonical_encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                      allow_nan=False)
_value_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _canonical_json(value):
    """One byte string per value, for fingerprints: sorted keys, no spaces,
    no NaN."""
    return _canonical_encoder.encode(value).encode("utf-8")


def _value_json(value):
    """A value as stored: its keys in their order, as a replay returns them."""
    return _value_encoder.encode(value).encode("utf-8")


# Counts the fork()s this process descends from (os.fork, multiprocessing):
# a layer opened under another count was inherited from a parent. Cheaper
# than asking os.getpid(), a system call, on every call.
_fork_generation = 0


def _after_fork_in_child():
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


# The claim of the decorated call running in this context, for checkpoint(),
# last_checkpoint() and subkey().
_running = contextvars.ContextVar("idempotency_claim", default=None)


def _running_claim(what):
    claim = _running.get()
    if claim is None:
        raise IdempotencyError(f"idempotency.{what}() is for a function decorated with "
                               "@layer.handle(), while it runs")
    return claim


def checkpoint(name, value=None):
    """Save a finished step of the running decorated call: its name (str)
    and a JSON value, in the key's record, fenced by the call's claim; it
    also renews the lease. If the call then dies or raises, the call that
    takes the key over starts from it (last_checkpoint()). ClaimLost: the
    key was taken over, stop. A store call: from an ``async def``
    function, ``await asyncio.to_thread(idempotency.checkpoint, ...)``."""
    _running_claim("checkpoint").checkpoint(name, _value_json(value))


def last_checkpoint():
    """(name, value) of the running call's last checkpoint: its own, or the
    one saved by an earlier call with its key that died or raised; None when
    there is none."""
    saved = _running_claim("last_checkpoint").last_checkpoint
    return None if saved is None else (saved[0], json.loads(saved[1]))


def subkey(step):
    """The Idempotency-Key for the running call's step (str) at another
    service, e.g. a card processor: the same for every call with this key,
    on every machine and after a takeover, different for any other key,
    prefix or step, and revealing nothing of the key (set the layer's
    subkey_secret for keys a client could guess)."""
    return _running_claim("subkey").subkey(step)


class IdempotencyLayer:
    """A store and the policy applied to it.

    ``url``: a store URL (``sqlite:///path.db``, ``redis://host:port``,
    ``postgresql://...``, ``memcached://...``, ``memory://``); None means
    default_url(). ``options`` are the library's, as keyword arguments:
    lease_ms, ttl_s, key_prefix, max_key_len, max_response_len,
    cache_bytes, auto_extend, commit_timeout_ms, subkey_secret.

    Thread-safe; the store calls release the GIL. Safe across fork(): a
    process that did not open the store opens its own on first use.
    """

    def __init__(self, url=None, **options):
        self.url = url if url is not None else default_url()
        self.options = dict(options)
        self._layer = _c.Layer(self.url, **self.options)
        self._generation = _fork_generation

    def _current(self):
        # A store belongs to the process that opened it; the library refuses
        # one inherited through fork(). The child opens its own, once; the
        # inherited one is then freed, which leaves the parent's alone.
        # _layer is set before _generation, so a thread that sees this
        # process's generation also sees this process's layer.
        if self._generation != _fork_generation:
            self._layer = _c.Layer(self.url, **self.options)
            self._generation = _fork_generation
        return self._layer

    @property
    def backend(self):
        """The store's driver: "sqlite", "redis", "postgresql", ..."""
        return self._current().backend

    def stats(self):
        """The layer's counters since it was made (in this process)."""
        return self._current().stats()

    # ---- the step API ----

    def begin(self, key, fingerprint=None, scope=None):
        """Claim key (str or bytes) for work that cannot be one function call.

        Returns a Claim, which the caller must commit(status, body,
        headers=None) or abort(), or a Reply (outcome REPLAYED,
        IN_PROGRESS or MISMATCH, with status, body, headers and
        retry_after_ms) when another request has the key. fingerprint:
        bytes identifying the request (None: not checked); scope: bytes or
        str keeping keys of tenants apart."""
        if isinstance(scope, str):
            scope = scope.encode("utf-8")
        return self._current().begin(_key_bytes(key), fingerprint, scope)

    # ---- the decorator ----

    def handle(self, key_func=None, fingerprint=None):
        """Decorate a function (or an ``async def`` one) to run once per key.

        key_func(*args, **kwargs) gives the key; without it the key is the
        ``idempotency_key`` keyword argument (passed on to the function). A
        call without a key raises MissingKey and runs nothing.

        The fingerprint tells a retry from a different request that reuses
        its key: by default the canonical JSON of the function's name and
        arguments (arguments that are not JSON raise TypeError, before
        anything runs); fingerprint(*args, **kwargs) may give bytes or str
        instead, and fingerprint=False turns the check off.

        Values are stored as JSON (``json.dumps``; tuples come back as
        lists)."""

        def decorate(fn):
            name = f"{fn.__module__}.{fn.__qualname__}"

            def prepare(args, kwargs):
                if key_func is not None:
                    key = key_func(*args, **kwargs)
                else:
                    key = kwargs.get("idempotency_key")
                if key is None or key == "" or key == b"":
                    raise MissingKey(f"{name}() needs an idempotency key: pass idempotency_key=..."
                                     if key_func is None else
                                     f"the key_func of {name}() gave no idempotency key")
                if fingerprint is False:
                    fp = None
                elif fingerprint is not None:
                    fp = fingerprint(*args, **kwargs)
                    fp = fp.encode("utf-8") if isinstance(fp, str) else bytes(fp)
                else:
                    # The library keeps a SHA-256 of it, not the bytes.
                    try:
                        fp = _canonical_json({"function": name, "args": list(args), "kwargs": kwargs})
                    except (TypeError, ValueError) as e:
                        raise TypeError(f"{name}(): the arguments are fingerprinted as JSON and {e}; "
                                        "pass fingerprint=... to handle()") from e
                return key, fp

            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def async_wrapper(*args, **kwargs):
                    key, fp = prepare(args, kwargs)
                    layer = self._current()
                    got = await asyncio.to_thread(layer.begin, _key_bytes(key), fp)
                    if isinstance(got, Reply):
                        return _answer(got, key)
                    running = _running.set(got)
                    try:
                        value = await fn(*args, **kwargs)
                    except BaseException:
                        await asyncio.to_thread(_abort, got, key)
                        raise
                    finally:
                        _running.reset(running)
                    return await asyncio.to_thread(_commit, got, key, value)
                return async_wrapper

            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                key, fp = prepare(args, kwargs)
                got = self._current().begin(_key_bytes(key), fp)
                if isinstance(got, Reply):
                    return _answer(got, key)
                running = _running.set(got)
                try:
                    value = fn(*args, **kwargs)
                except BaseException:
                    _abort(got, key)
                    raise
                finally:
                    _running.reset(running)
                return _commit(got, key, value)
            return wrapper

        return decorate


def _answer(reply, key):
    """The seed's shapes for a call that did not run the function."""
    if reply.outcome == REPLAYED:
        return (json.loads(reply.body) if reply.body else None), reply.status
    if reply.outcome == IN_PROGRESS:
        return {
            "error": "Request currently processing",
            "status_code": 409,
            "retry_after": math.ceil(reply.retry_after_ms / 1000),
            "message": f"Request with key {_key_text(key)} is being processed",
        }
    return {
        "error": "Idempotency key reused with different arguments",
        "status_code": 422,
        "message": f"Request with key {_key_text(key)} was first made with other arguments",
    }


def _abort(claim, key):
    # The function's own exception is what the caller must see; a store
    # that cannot be told only delays the key's release to its lease's end.
    try:
        claim.abort()
    except IdempotencyError as e:
        log.warning("idempotency key %s: could not be freed now (%s); it frees itself when its "
                    "lease ends", _key_text(key), e)


def _commit(claim, key, value):
    try:
        body = _value_json(value)
    except (TypeError, ValueError) as e:
        _store_unstorable(claim, key, f"the value is not JSON ({e})")
        raise ResultNotStorable(f"key {_key_text(key)}: the function ran but its value cannot be "
                                f"stored as JSON ({e}); later calls replay a 500 record", value) from e
    try:
        claim.commit(200, body)
    except ResponseTooLarge as e:
        _store_unstorable(claim, key, f"the value is too large ({e})")
        raise ResultNotStorable(f"key {_key_text(key)}: the function ran but its value is too large "
                                f"to store ({e}); later calls replay a 500 record", value) from e
    except ClaimLost as e:
        # The function outran its lease and another call took the key and
        # may run it again: the value is this call's answer, unstored.
        log.error("idempotency key %s: %s", _key_text(key), e)
    except IdempotencyError as e:
        # The store kept failing for the whole lease. The work is done: the
        # key stays claimed until the lease ends rather than being freed for
        # a retry to do it again at once.
        claim.abandon()
        log.error("idempotency key %s: the result could not be stored: %s", _key_text(key), e)
    return value


def _store_unstorable(claim, key, why):
    record = _value_json({
        "error": "Result could not be stored",
        "status_code": 500,
        "message": f"Request with key {_key_text(key)} was processed, but {why}",
    })
    try:
        try:
            claim.commit(500, record)
        except ResponseTooLarge:
            # A max_response_len below the record's size: an empty body
            # fits any limit, and replays as None.
            claim.commit(500, b"")
    except ClaimLost:
        pass
    except IdempotencyError as e:
        claim.abandon()
        log.error("idempotency key %s: could not store the error record: %s", _key_text(key), e)


from .middleware import IdempotencyASGIMiddleware, IdempotencyMiddleware  # noqa: E402
