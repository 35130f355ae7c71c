"""Shared fixtures: a running server on an ephemeral port, a client, a fresh registry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from allocator_client import AllocatorClient
from prometheus_client import CollectorRegistry

from allocator.config import ServerConfig
from allocator.server import Running, create_server

pytest_plugins = ["tests.conftest_pg"]

ADMIN_TOKEN = "test-admin-token"


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def server_config(database_url: str, **overrides: object) -> ServerConfig:
    """A config for an in-process test server: ephemeral ports, fast housekeeping."""
    base = ServerConfig(
        listen="127.0.0.1:0",
        http_port=0,
        database_url=database_url,
        admin_token=ADMIN_TOKEN,
        replica_id="test-replica",
        sync_interval_s=0.1,
        snapshot_interval_s=0.5,
        default_grace_s=0.1,  # tests with 2 s windows need not wait the 35 s
        log_json=False,
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh Prometheus registry per test."""
    return CollectorRegistry()


@pytest.fixture
def server(tmp_path: Path, registry: CollectorRegistry) -> Iterator[Running]:
    """A real server on SQLite in tmp_path, port 0."""
    running = create_server(
        server_config(f"sqlite:///{tmp_path / 'alloc.sqlite'}"), registry=registry
    )
    yield running
    running.stop(grace=1.0)


@pytest.fixture
def client(server: Running) -> Iterator[AllocatorClient]:
    """A client with the admin token."""
    with AllocatorClient(f"127.0.0.1:{server.port}", admin_token=ADMIN_TOKEN, timeout=10) as c:
        yield c
