"""What a daemon thaws when it stops (HeldFrozen) and when it starts (to_thaw): pure decisions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.leftovers import HeldFrozen, to_thaw
from daemon.runtimes import ListedContainer
from freeze_proxy.contract import SIDECAR_NAME

WHO = {"pod_uid": "u1", "pod_name": "a-1", "namespace": "shop"}


def c(pod: str, name: str, status: str, cid: str | None = None) -> ListedContainer:
    return ListedContainer(pod, f"{pod}-name", "ns", name, cid or f"{pod}/{name}", status)


def test_only_paused_containers_of_pods_with_our_sidecar_are_thawed() -> None:
    listing = [
        c("ours", "user-container", "PAUSED"),
        c("ours", "other", "PAUSING"),
        c("ours", "running", "RUNNING"),
        c("ours", "exited", "STOPPED"),
        c("ours", "queue-proxy", "RUNNING"),
        c("ours", SIDECAR_NAME, "RUNNING"),
        c("theirs", "user-container", "PAUSED"),  # no sidecar: someone else's pause
        c("theirs", "queue-proxy", "PAUSED"),
        c("", SIDECAR_NAME, "PAUSED"),  # no pod UID: not kubelet's
        c("", "x", "PAUSED"),
    ]
    assert [x.container_id for x in to_thaw(listing)] == ["ours/user-container", "ours/other"]


def test_an_exited_sidecar_still_marks_the_pod_ours() -> None:
    listing = [c("p", SIDECAR_NAME, "STOPPED"), c("p", "user-container", "PAUSED")]
    assert to_thaw(listing) == [listing[1]]


def test_the_sidecar_name_is_a_parameter() -> None:
    listing = [c("p", "my-proxy", "RUNNING"), c("p", "app", "PAUSED")]
    assert to_thaw(listing) == []
    assert to_thaw(listing, sidecar="my-proxy") == [listing[1]]


statuses = st.sampled_from(["RUNNING", "PAUSED", "PAUSING", "STOPPED", "CREATED", "UNKNOWN"])
containers = st.builds(
    c, st.sampled_from(["", "p1", "p2", "p3"]), st.sampled_from(["a", "b", SIDECAR_NAME]), statuses
)


@given(st.lists(containers, max_size=20))
def test_to_thaw_never_touches_a_running_container_or_a_pod_without_our_sidecar(
    listing: list[ListedContainer],
) -> None:
    chosen = to_thaw(listing)
    ours = {x.pod_uid for x in listing if x.name == SIDECAR_NAME and x.pod_uid}
    assert all(x.status in ("PAUSED", "PAUSING") and x.pod_uid in ours for x in chosen)
    # ... and misses none that is.
    assert len(chosen) == sum(
        1 for x in listing if x.pod_uid in ours and x.status in ("PAUSED", "PAUSING")
    )


def test_a_freeze_holds_the_pod_until_a_thaw_succeeds() -> None:
    held = HeldFrozen()
    held.freezing("u1", WHO, [])
    assert [(h.pod_uid, h.who, h.narrowings) for h in held.pods()] == [("u1", WHO, ((),))]
    held.thawed("u2", [])  # another pod: nothing
    assert len(held) == 1
    held.thawed("u1", [])
    assert held.pods() == []


def test_every_narrowing_frozen_is_held_until_thawed_or_the_whole_pod_is() -> None:
    held = HeldFrozen()
    held.freezing("u1", WHO, ["a"])
    held.freezing("u1", WHO, ["b"])
    held.freezing("u1", WHO, ["a"])  # the same again: held once
    assert held.pods()[0].narrowings == (("a",), ("b",))
    held.thawed("u1", ["a"])
    assert held.pods()[0].narrowings == (("b",),)
    held.freezing("u1", WHO, ["a", "b"])
    held.thawed("u1", [])  # the whole pod: all of them
    assert held.pods() == []


def test_held_frozen_is_bounded_oldest_first() -> None:
    held = HeldFrozen(max_pods=2)
    for uid in ("u1", "u2", "u3"):
        held.freezing(uid, WHO, [])
    assert [h.pod_uid for h in held.pods()] == ["u2", "u3"]
    held.freezing("u2", WHO, [])  # refreshed: now the newest
    held.freezing("u4", WHO, [])
    assert [h.pod_uid for h in held.pods()] == ["u2", "u4"]
