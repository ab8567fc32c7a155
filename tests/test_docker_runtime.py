"""The docker backend's pure parts: which of Docker's containers a pod's freeze touches, and how
Docker's states read as the Tasks API's (what the start-up thaw looks for)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from daemon.leftovers import to_thaw
from daemon.runtimes import NEVER_FROZEN, ContainerNotFound, choose
from daemon.runtimes.docker import (
    docker_status,
    listed,
    pod_filter,
    running_by_name,
)
from freeze_proxy.contract import SIDECAR_NAME

UID = "0b7c2d4e-1111-4c3b-9f00-000000000001"
OTHER = "0b7c2d4e-2222-4c3b-9f00-000000000002"


def entry(
    cid: str,
    name: str,
    *,
    uid: str = UID,
    state: str = "running",
    kind: str = "container",
    created: int = 100,
) -> dict[str, Any]:
    """One element of GET /containers/json as Docker returns it for a cri-dockerd container."""
    return {
        "Id": cid,
        "Names": [f"/k8s_{name}_app_default_{uid}_0"],
        "State": state,
        "Created": created,
        "Labels": {
            "io.kubernetes.pod.uid": uid,
            "io.kubernetes.pod.name": "app",
            "io.kubernetes.pod.namespace": "default",
            "io.kubernetes.docker.type": kind,
            **({"io.kubernetes.container.name": name} if kind == "container" else {}),
        },
    }


def test_the_filter_asks_for_the_pods_app_containers_only() -> None:
    assert json.loads(pod_filter(UID)) == {
        "label": [f"io.kubernetes.pod.uid={UID}", "io.kubernetes.docker.type=container"]
    }


def test_running_by_name_skips_the_sandbox_other_pods_and_stopped_containers() -> None:
    listing = [
        entry("s1", "POD", kind="podsandbox"),
        entry("u1", "user-container"),
        entry("q1", "queue-proxy"),
        entry("f1", SIDECAR_NAME, state="paused"),  # paused is live: it can be thawed
        entry("old", "worker", state="exited"),
        entry("x1", "user-container", uid=OTHER),
    ]
    assert running_by_name(listing, UID) == {
        "user-container": "u1",
        "queue-proxy": "q1",
        SIDECAR_NAME: "f1",
    }


def test_of_two_live_containers_of_one_name_the_newest_wins() -> None:
    listing = [
        entry("new", "user-container", created=200),
        entry("old", "user-container", created=100),
    ]
    assert running_by_name(listing, UID) == {"user-container": "new"}
    assert running_by_name(list(reversed(listing)), UID) == {"user-container": "new"}


def test_a_container_without_the_name_label_goes_by_its_docker_name() -> None:
    c = entry("u1", "user-container")
    del c["Labels"]["io.kubernetes.container.name"]
    c["Names"] = ["/plain"]
    assert running_by_name([c], UID) == {"plain": "u1"}


def test_choose_leaves_out_what_is_never_frozen() -> None:
    running = {"user-container": "u", "queue-proxy": "q", SIDECAR_NAME: "f", "worker": "w"}
    assert choose(UID, running, []) == {"user-container": "u", "worker": "w"}
    assert NEVER_FROZEN == {"queue-proxy", SIDECAR_NAME, "istio-proxy", "linkerd-proxy"}


def test_choose_names_what_is_missing() -> None:
    with pytest.raises(ContainerNotFound, match=r"'nope'.*running: queue-proxy, user-container"):
        choose(UID, {"user-container": "u", "queue-proxy": "q"}, ["nope"])
    with pytest.raises(ContainerNotFound, match="no container to freeze"):
        choose(UID, {"queue-proxy": "q", SIDECAR_NAME: "f"}, [])
    assert choose(UID, {"a": "1", "b": "2"}, ["b", "b"]) == {"b": "2"}


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("running", "RUNNING"),
        ("paused", "PAUSED"),
        ("created", "CREATED"),
        ("exited", "STOPPED"),
        ("dead", "STOPPED"),
        ("removing", "STOPPED"),
        ("restarting", "UNKNOWN"),
        ("something-new", "UNKNOWN"),
    ],
)
def test_docker_states_read_as_task_states(state: str, status: str) -> None:
    assert docker_status(state) == status


def test_listing_leaves_out_sandboxes_and_feeds_the_start_up_thaw() -> None:
    raw = [
        entry("s1", "POD", kind="podsandbox", state="paused"),
        entry("u1", "user-container", state="paused"),
        entry("f1", SIDECAR_NAME),
        entry("x1", "user-container", uid=OTHER, state="paused"),  # no sidecar: not ours
        {"Id": "z1", "Names": ["/someone-elses"], "State": "paused", "Labels": {}},
    ]
    got = [c for c in (listed(e) for e in raw) if c is not None]
    assert [c.container_id for c in got] == ["u1", "f1", "x1", "z1"]
    assert got[0].pod_uid == UID and got[0].name == "user-container"
    assert got[0].status == "PAUSED" and got[0].pod_name == "app"
    assert got[3].pod_uid == "" and got[3].name == "someone-elses"
    assert [c.container_id for c in to_thaw(got)] == ["u1"]
