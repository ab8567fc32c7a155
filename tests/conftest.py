"""Shared fixtures: a private containerd for the session and a factory of busybox pods."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from testbed.containerd import Containerd, missing_prerequisites
from testbed.pods import ContainerSpec, MakePod, Pod, PodClient, sleeper, ticker
from tests.proxy_harness import Harness, start_harness

# The real control plane (etcd + kube-apiserver) and the Go-built binaries' fixtures.
pytest_plugins = ["tests.apiserver_fixtures", "tests.image_fixtures"]


def _unavailable(reason: str) -> NoReturn:
    """Skip, unless FREEZE_REQUIRE_REAL=1 says the real thing must be tested (CI)."""
    if os.environ.get("FREEZE_REQUIRE_REAL") == "1":
        pytest.fail(f"FREEZE_REQUIRE_REAL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A started private containerd with the busybox image imported; fully cleaned up after."""
    why = missing_prerequisites()
    if why:
        _unavailable(f"a real containerd cannot run here: {why}")
    with Containerd() as cd:
        yield cd


@pytest.fixture
async def make_pod(containerd: Containerd) -> AsyncIterator[MakePod]:
    """Factory of running pods: a "user-container" ticking every 150 ms (plus an optional
    sleeping "queue-proxy" and extra containers); every pod is removed at teardown."""
    client = PodClient(containerd)

    async def make(
        *,
        queue_proxy: bool = False,
        extra: Sequence[ContainerSpec] = (),
        name: str | None = None,
    ) -> Pod:
        specs = [ticker(), *([sleeper("queue-proxy")] if queue_proxy else []), *extra]
        return await client.create_pod(specs, name=name)

    yield make
    await client.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The in-process proxy in front of a real app, with the app frozen once it idled."""
    h = await start_harness(tmp_path)
    await h.wait_for(lambda: h.daemon.frozen)
    yield h
    await h.close()
    assert h.app.violations == [], "the app received work while frozen"
