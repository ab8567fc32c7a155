"""daemon.runtimes.apply_to_pod, the one place every backend freezes and thaws a pod's list:
all-or-none for a freeze, best effort for a thaw. A unit test of that one function: the
runtime's per-container call is a fake that records what it was asked and fails on demand;
the lookup is the real PodCache over a fake listing. (Real containerd: tests/test_daemon_multi.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from daemon.runtimes import (
    ContainerNotFound,
    ContainersFailed,
    PodCache,
    RuntimeFailure,
    Stale,
    apply_to_pod,
)

UID = "pod-1"


@dataclass
class FakeNode:
    """One pod's running containers (name -> id) and a runtime call that can fail per id."""

    running: dict[str, str]
    fail: dict[str, Exception] = field(default_factory=dict)  # id -> raised by call
    fail_undo: dict[str, Exception] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    cache: PodCache = field(default_factory=PodCache)

    async def _list(self, pod_uid: str) -> dict[str, str]:
        return dict(self.running) if pod_uid == UID else {}

    async def lookup(self, pod_uid: str, names: Sequence[str], refresh: bool) -> dict[str, str]:
        return await self.cache.lookup(pod_uid, names, refresh, self._list)

    async def call(self, name: str, cid: str) -> None:
        self.calls.append(("do", cid))
        await asyncio.sleep(0)
        if cid in self.fail:
            raise self.fail[cid]

    async def undo(self, name: str, cid: str) -> None:
        self.calls.append(("undo", cid))
        if cid in self.fail_undo:
            raise self.fail_undo[cid]

    async def freeze(self, names: Sequence[str] = ()) -> list[str]:
        return await apply_to_pod(UID, names, self.lookup, self.cache.forget, self.call, self.undo)

    async def thaw(self, names: Sequence[str] = ()) -> list[str]:
        return await apply_to_pod(UID, names, self.lookup, self.cache.forget, self.call)


def node() -> FakeNode:
    return FakeNode({"app": "c-app", "log": "c-log", "queue-proxy": "c-qp"})


async def test_a_freeze_that_fully_succeeds_changes_nothing_else() -> None:
    n = node()
    assert await n.freeze(["app", "log"]) == ["app", "log"]
    assert sorted(n.calls) == [("do", "c-app"), ("do", "c-log")]


async def test_one_failed_freeze_thaws_the_others_back_and_names_it() -> None:
    n = node()
    n.fail["c-log"] = RuntimeFailure("containerd: pause of container log: EBUSY")
    with pytest.raises(ContainersFailed) as err:
        await n.freeze(["app", "log"])
    e = err.value
    assert (e.container, e.thawed_back, e.not_thawed_back) == ("log", ["app"], {})
    assert e.failed == {"log": "containerd: pause of container log: EBUSY"}
    assert str(e) == (
        f"freeze of container 'log' of pod {UID} failed: containerd: pause of container log: "
        "EBUSY; thawed back 'app'"
    )
    assert ("undo", "c-app") in n.calls and ("undo", "c-log") not in n.calls
    assert isinstance(e, RuntimeFailure)  # answered 502 like any runtime failure


async def test_a_thaw_back_that_fails_too_is_said() -> None:
    n = node()
    n.fail["c-log"] = RuntimeFailure("boom")
    n.fail_undo["c-app"] = RuntimeFailure("resume refused")
    with pytest.raises(ContainersFailed) as err:
        await n.freeze(["app", "log"])
    assert err.value.thawed_back == []
    assert err.value.not_thawed_back == {"app": "resume refused"}
    assert "could NOT thaw back 'app': resume refused" in str(err.value)


async def test_every_failure_is_named_in_list_order() -> None:
    n = FakeNode({"a": "1", "b": "2", "c": "3"})
    n.fail = {"3": RuntimeFailure("x"), "2": ValueError("bad")}
    with pytest.raises(ContainersFailed) as err:
        await n.freeze(["a", "b", "c"])
    assert list(err.value.failed) == ["b", "c"] and err.value.container == "b"
    assert err.value.failed["b"] == "ValueError: bad"  # an unexpected error fails it too
    assert "also failed: 'c'" in str(err.value) and err.value.thawed_back == ["a"]


async def test_a_container_gone_since_the_lookup_fails_the_freeze() -> None:
    n = node()
    await n.freeze(["app", "log"])  # the lookup is cached
    del n.running["log"]  # it exited: the runtime says its task is gone
    n.fail["c-log"] = Stale("log", "no running task found")
    with pytest.raises(ContainersFailed) as err:
        await n.freeze(["app", "log"])
    assert err.value.container == "log" and err.value.thawed_back == ["app"]
    assert "no running container named 'log'" in err.value.failed["log"]


async def test_a_container_replaced_since_the_lookup_is_called_by_its_new_id() -> None:
    n = node()
    await n.freeze(["app", "log"])
    n.running["log"] = "c-log-2"
    n.fail["c-log"] = Stale("log", "not found")
    n.calls.clear()
    assert await n.freeze(["app", "log"]) == ["app", "log"]
    assert ("do", "c-log-2") in n.calls

    # ...and a failure after that thaws back the new id, not the old one.
    n.running["app"] = "c-app-2"
    n.fail["c-app"] = Stale("app", "not found")
    n.fail["c-log-2"] = RuntimeFailure("boom")
    n.calls.clear()
    with pytest.raises(ContainersFailed):
        await n.freeze(["app", "log"])
    assert ("undo", "c-app-2") in n.calls and ("undo", "c-app") not in n.calls


async def test_replaced_twice_is_gone() -> None:
    n = FakeNode({"app": "c1"})
    await n.freeze()
    n.running["app"] = "c2"
    n.fail = {"c1": Stale("app", "gone"), "c2": Stale("app", "gone again")}
    with pytest.raises(ContainerNotFound, match=r"container app of pod pod-1 is gone: gone again"):
        await n.freeze()  # a list of one, nothing else done: 404 as before


async def test_a_named_container_not_running_freezes_nothing() -> None:
    n = node()
    with pytest.raises(ContainerNotFound, match=r"no running container named 'nope'"):
        await n.freeze(["app", "nope"])
    assert n.calls == []


async def test_a_failed_thaw_still_thaws_the_others_and_names_the_failed() -> None:
    n = node()
    n.fail["c-app"] = RuntimeFailure("resume refused")
    with pytest.raises(ContainersFailed) as err:
        await n.thaw(["app", "log"])
    assert err.value.failed == {"app": "resume refused"}
    assert str(err.value) == f"thaw of container 'app' of pod {UID} failed: resume refused"
    assert sorted(n.calls) == [("do", "c-app"), ("do", "c-log")]  # no undo of a thaw


async def test_a_thaw_goes_on_without_a_container_that_is_gone() -> None:
    """A sidecar that crashed while the pod was frozen must not keep the app frozen."""
    n = node()
    del n.running["log"]
    assert await n.thaw(["app", "log"]) == ["app"]
    await n.freeze(["app"])
    n.fail["c-app"] = Stale("app", "gone")
    n.running["app"] = "c-app-2"
    n.running["log"] = "c-log"
    await n.freeze(["app", "log"])  # cached again
    del n.running["log"]
    n.fail["c-log"] = Stale("log", "gone")
    assert await n.thaw(["app", "log"]) == ["app"]


async def test_a_thaw_of_nothing_left_is_not_found() -> None:
    n = node()
    n.running.clear()
    with pytest.raises(ContainerNotFound):
        await n.thaw(["app", "log"])
    n.running.update({"log": "c-log"})
    await n.thaw(["log"])
    del n.running["log"]
    n.fail["c-log"] = Stale("log", "gone")
    with pytest.raises(ContainerNotFound):
        await n.thaw(["log"])


async def test_the_default_list_is_all_but_the_request_path() -> None:
    n = FakeNode({"app": "1", "queue-proxy": "2", "istio-proxy": "3", "freeze-proxy": "4"})
    assert await n.freeze() == ["app"]


async def test_cancellation_is_not_a_failure() -> None:
    n = node()
    n.fail["c-log"] = asyncio.CancelledError()  # type: ignore[assignment]
    with pytest.raises(asyncio.CancelledError):
        await n.freeze(["app", "log"])
