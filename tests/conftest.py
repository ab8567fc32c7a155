"""Shared fixtures: a private containerd for the session and a factory of busybox pods."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from testbed.containerd import (
    DEFAULT_FLAVOR,
    FLAVORS,
    Containerd,
    Flavor,
    TestbedError,
    missing_prerequisites,
)
from testbed.pods import ContainerSpec, MakePod, Pod, PodClient, sleeper, ticker
from tests.proxy_harness import Harness, start_harness

# The real control plane (etcd + kube-apiserver) and the Go-built binaries' fixtures.
pytest_plugins = ["tests.apiserver_fixtures", "tests.image_fixtures"]


def _unavailable(reason: str) -> NoReturn:
    """Skip, unless FREEZE_REQUIRE_REAL=1 says the real thing must be tested (CI)."""
    if os.environ.get("FREEZE_REQUIRE_REAL") == "1":
        pytest.fail(f"FREEZE_REQUIRE_REAL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``containerd_flavors`` that use ``containerd`` run once per flavor (the
    runtime backends' real tests); every other test gets the 1.6 one only."""
    if "containerd" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "containerd_flavors"
    ):
        metafunc.parametrize(
            "containerd",
            FLAVORS,
            indirect=True,
            ids=[f"containerd-{f}" for f in FLAVORS],
            scope="session",
        )


@pytest.fixture(scope="session")
def _containerds() -> Iterator[dict[Flavor, Containerd]]:
    """The session's private containerds, at most one per flavor, each started on first use
    (so switching flavors between tests restarts nothing) and fully cleaned up at the end."""
    running: dict[Flavor, Containerd] = {}
    yield running
    errors: list[str] = []
    for cd in running.values():
        try:
            cd.stop()
        except TestbedError as err:
            errors.append(f"{cd.flavor}: {err}")
    assert not errors, errors


@pytest.fixture(scope="session")
def containerd(
    request: pytest.FixtureRequest, _containerds: dict[Flavor, Containerd]
) -> Containerd:
    """A started private containerd with the busybox image imported: Debian's 1.6, or the
    flavor ``containerd_flavors`` parametrizes (2.x is built from its Go module when missing,
    unless FREEZE_NO_BUILD=1)."""
    flavor: Flavor = getattr(request, "param", DEFAULT_FLAVOR)
    if flavor not in _containerds:
        build = os.environ.get("FREEZE_NO_BUILD", "") != "1"
        why = missing_prerequisites(flavor, build=build)
        if why:
            _unavailable(f"a real containerd {flavor} cannot run here: {why}")
        _containerds[flavor] = Containerd(flavor=flavor).start()
    return _containerds[flavor]


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
