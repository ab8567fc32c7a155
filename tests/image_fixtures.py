"""pytest plugin: our four images, built for real once per session (testbed/images.py).

Used by tests/test_images.py (each image run on its own) and tests/test_node.py (the images on a
real node). One engine per session: a second one on the same data root would wait for the
first's lock.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed import images
from testbed.docker import Dockerd, DockerError, missing_prerequisites
from testbed.images import IMAGES, Built
from tests.conftest import _unavailable

__all__ = ["IMAGES", "MIB", "PROGRAMS", "REGISTRY", "TAG", "Built"]

REGISTRY = "freeze-test.local"
TAG = "test"
PROGRAMS = ["proxy", "daemon", "webhook"]
MIB = 1024 * 1024


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Dockerd]:
    why = missing_prerequisites()
    if why:
        _unavailable(f"a private dockerd cannot run here: {why}")
    with Dockerd() as engine:
        yield engine


@pytest.fixture(scope="session")
def built(dockerd: Dockerd) -> Built:
    try:
        result = images.build(dockerd, REGISTRY, TAG)
    except DockerError as err:
        pytest.fail(str(err), pytrace=False)
    print(f"images built in {result.seconds:.1f} s")
    return result
