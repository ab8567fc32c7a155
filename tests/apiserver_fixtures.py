"""pytest plugin: a real etcd + kube-apiserver and Knative's queue-proxy binary.

Register with ``pytest_plugins = ["tests.apiserver_fixtures"]`` in ``tests/conftest.py``.

Binaries come from ``scripts/build_k8s.sh`` (through :mod:`testbed.gobins`), which builds them
from Go modules the first time (many minutes on two cores) and caches them outside the repo.
When they cannot be built (no Go toolchain, no module proxy, a compile error) the tests that
need them are skipped with the reason, unless ``FREEZE_REQUIRE_REAL=1``: then they fail.
``FREEZE_NO_BUILD=1`` never starts a build (missing binaries skip, or fail as above).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from testbed import gobins
from testbed.apiserver import ApiServer


def _require_real() -> bool:
    return os.environ.get("FREEZE_REQUIRE_REAL", "") == "1"


def _unavailable(what: str, err: Exception) -> NoReturn:
    msg = f"{what} unavailable: {err}"
    if _require_real():
        pytest.fail(f"{msg} (FREEZE_REQUIRE_REAL=1)", pytrace=False)
    pytest.skip(msg)


def _binaries(*names: str) -> dict[str, Path]:
    try:
        return gobins.binaries(*names, build=os.environ.get("FREEZE_NO_BUILD", "") != "1")
    except gobins.BuildError as err:
        _unavailable(", ".join(names), err)


@pytest.fixture(scope="session")
def k8s_binaries() -> dict[str, Path]:
    """Paths of etcd, kube-apiserver and kubectl (built when missing)."""
    return _binaries("etcd", "kube-apiserver", "kubectl")


@pytest.fixture(scope="session")
def apiserver(k8s_binaries: dict[str, Path]) -> Iterator[ApiServer]:
    """A running etcd + kube-apiserver for the whole session (see testbed.apiserver)."""
    server = ApiServer(
        etcd_bin=k8s_binaries["etcd"],
        apiserver_bin=k8s_binaries["kube-apiserver"],
        kubectl_bin=k8s_binaries["kubectl"],
    )
    server.start()  # a start failure with built binaries is a real failure, never a skip
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def queue_proxy_binary() -> Path:
    """Path of Knative's queue-proxy (built when missing)."""
    return _binaries("queue-proxy")["queue-proxy"]
