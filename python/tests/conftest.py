"""Fixtures: the store under test comes from --url (meson passes it: with_server
appends the URL of the server it started; 'sqlite' means a new SQLite file
per test). Each test gets a key prefix of its own, so tests sharing one
server never see each other's keys."""

import uuid

import pytest

import idempotency


def pytest_addoption(parser):
    parser.addoption("--url", required=True,
                     help="the store to test: a URL, or 'sqlite' for a new SQLite file per test")


@pytest.fixture
def url(request, tmp_path):
    base = request.config.getoption("--url")
    return f"sqlite://{tmp_path}/idem.db" if base == "sqlite" else base


@pytest.fixture
def prefix():
    return "t" + uuid.uuid4().hex[:16] + ":"


@pytest.fixture
def make_layer(url, prefix):
    def make(**options):
        options.setdefault("key_prefix", prefix)
        return idempotency.IdempotencyLayer(url, **options)
    return make


@pytest.fixture
def layer(make_layer):
    return make_layer()
