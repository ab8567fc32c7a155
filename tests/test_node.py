"""freeze-proxy installed and used the way a Knative operator does, on a real node.

One cluster for the module (testbed/cluster.py: kubelet on containerd, CNI, kube-proxy, CoreDNS,
Knative Serving v0.50.0 built from its module), our four images built by the real Dockerfiles
(tests/image_fixtures.py) and imported into the node's containerd. Then: `kubectl apply -k` of
config/ (an overlay that only names the local images and this node's containerd socket, as a
user with a private registry or k3s would), Knative Services applied unchanged but for the image,
and what the user would check: pods Ready and mutated, the app frozen when idle and answering
when called, probes not restarting anything, scale to zero, deletion and uninstall.

The checks are the issue's proofs 1-7 and issue #15's two daemon faults (8: a rolling update,
9: SIGKILL), run in file order (proof 5 late, so that its wait for the token's rotation overlaps
the others); later tests build on the install of earlier ones (module-scoped fixtures), and the
uninstall is last.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freeze_proxy import contract
from testbed import hostside, install
from testbed.cluster import BRIDGE, CGROUP_ROOT, NODE_NAME, Cluster, missing_prerequisites
from testbed.install import get, pods, queue_proxy_url, ready_pod, refresh, revision_route, until
from tests.conftest import _unavailable
from tests.image_fixtures import IMAGES, REGISTRY, Built
from tests.reliability_report import write_figure

pytestmark = pytest.mark.node

GRACE_BOUND = 60.0  # seconds: how long a frozen pod may take to go (its grace is 300 s)


# ---- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = missing_prerequisites()
    if why:
        _unavailable(f"a real node cannot run here: {why}")
    tar = built.save(list(IMAGES), tmp_path_factory.mktemp("images") / "freeze-images.tar")
    with Cluster(images=[tar], skip_tag_resolution=[REGISTRY]) as c:
        yield c
    left = hostside.HostSnapshot.capture(bridge=BRIDGE, cgroup_root=CGROUP_ROOT).leftovers()
    assert not left, f"the cluster left the host changed: {left}"


@pytest.fixture(scope="module")
def installed(cluster: Cluster, built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Proof 1's install: `kubectl apply -k` of the overlay; the DaemonSet and webhook Ready."""
    assert cluster.containerd is not None
    kustomization = install.overlay(
        tmp_path_factory.mktemp("overlay"), built.refs, cluster.containerd.socket
    )
    install.install(cluster, kustomization)
    return kustomization


@pytest.fixture(scope="module")
def sleeptalker(cluster: Cluster, installed: Path, built: Built) -> dict[str, Any]:
    """Proof 2's Service: the example as shipped (but for the image); its Ready pod."""
    return install.deploy(cluster, install.example(built.refs["sleeptalker"]))


def frozen(pod: dict[str, Any]) -> bool:
    return install.freezer_state(pod) == "FROZEN"


def restarts(pod: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: int(s["restartCount"]) for s in pod["status"]["containerStatuses"]}


# ---- proofs ---------------------------------------------------------------------------------


def test_1_install_runs_the_daemon_on_the_labelled_node_and_the_webhook_bootstraps_tls(
    cluster: Cluster, installed: Path
) -> None:
    daemons = cluster.get_json("pods", "-n", "knative-serving", "-l", f"app={install.DAEMONSET}")
    assert [p["spec"]["nodeName"] for p in daemons["items"]] == [NODE_NAME]
    assert all(install.is_ready(p) for p in daemons["items"])
    hook = cluster.get_json("mutatingwebhookconfiguration", install.WEBHOOK_CONFIGURATION)
    assert all(w["clientConfig"].get("caBundle") for w in hook["webhooks"]), hook["webhooks"]
    webhook = cluster.get_json("deployment", "-n", "knative-serving", install.WEBHOOK)
    assert webhook["status"].get("readyReplicas") == webhook["spec"]["replicas"]


def test_2_knative_makes_the_revision_pod_and_our_webhook_mutates_it(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    spec = sleeptalker["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert "freeze-proxy" in names and "queue-proxy" in names and "user-container" in names
    qp = next(c for c in spec["containers"] if c["name"] == "queue-proxy")
    env = {e["name"]: e.get("value") for e in qp["env"]}
    assert env["USER_PORT"] == str(contract.PROXY_PORT)
    projected = [v for v in spec["volumes"] if "projected" in v]
    tokens = [
        s["serviceAccountToken"]
        for v in projected
        for s in v["projected"]["sources"]
        if "serviceAccountToken" in s
    ]
    # kube-api-access-* (no audience: the API server's) and ours.
    assert [t["audience"] for t in tokens if t.get("audience")] == [contract.TOKEN_AUDIENCE]
    assert install.is_ready(sleeptalker)


def _warnings_of_webhook(cluster: Cluster) -> str:
    return cluster.kubectl(
        "logs", "-n", "knative-serving", "-l", "app=freezer-webhook", "--tail=-1", "--prefix"
    ).stdout


def test_2b_an_h2c_service_as_knative_makes_it_runs_unmutated_with_a_warning(
    cluster: Cluster, installed: Path, built: Built
) -> None:
    """The pod shape Knative really produces for `ports: [{name: h2c}]` (not a fixture):
    admitted unchanged (the proxy does not relay h2c yet), Ready, and the webhook says why."""
    ksvc = install.service("grpc", built.refs["sleeptalker"], {})
    ksvc["spec"]["template"]["spec"]["containers"][0]["ports"] = [
        {"name": "h2c", "containerPort": 8080}
    ]
    pod = install.deploy(cluster, ksvc)
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert contract.SIDECAR_NAME not in names, names
    qp = next(c for c in pod["spec"]["containers"] if c["name"] == "queue-proxy")
    assert {"name": "queue-port", "containerPort": 8013, "protocol": "TCP"} in qp["ports"]
    assert install.is_ready(pod)
    assert "h2c" in _warnings_of_webhook(cluster)
    cluster.kubectl("delete", "ksvc", "grpc", "--wait=false")


def test_2c_a_multi_container_service_freezes_its_serving_container(
    cluster: Cluster, installed: Path, built: Built
) -> None:
    """Knative's multi-container shape (user-container-0 has the port): the webhook finds the
    serving container through queue-proxy's USER_PORT; it freezes with its sidecar."""
    ksvc = install.service("multi", built.refs["sleeptalker"], {})
    serving = ksvc["spec"]["template"]["spec"]["containers"][0]
    serving["ports"] = [{"containerPort": 8080}]
    helper = {
        "image": built.refs["sleeptalker"],
        "env": [{"name": "PORT", "value": "8081"}, {"name": "TICK_INTERVAL", "value": "0.5"}],
    }
    ksvc["spec"]["template"]["spec"]["containers"].append(helper)
    pod = install.deploy(cluster, ksvc)
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert "user-container-0" in names and "user-container-1" in names, names
    proxy = next(c for c in pod["spec"]["containers"] if c["name"] == contract.SIDECAR_NAME)
    both = ("user-container-0", "user-container-1")
    flags = proxy["args"][proxy["args"].index(contract.FLAG_CONTAINER) :]
    assert flags == [arg for c in both for arg in (contract.FLAG_CONTAINER, c)]
    until(
        "the serving container and its sidecar frozen",
        lambda: all(install.freezer_state(pod, c) == "FROZEN" for c in both),
        30,
    )
    status, body = get(queue_proxy_url(pod))
    assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])
    cluster.kubectl("delete", "ksvc", "multi", "--wait=false")


def test_3_idle_app_is_frozen_and_a_request_through_queue_proxy_wakes_it(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    pod = sleeptalker
    until("the idle app frozen", lambda: frozen(pod), 30)
    before = install.ticks(cluster, pod)
    time.sleep(2)  # measuring that nothing happens takes time: ticks every 0.5 s when awake
    assert install.ticks(cluster, pod) == before, "a frozen app ticked"
    status, body = get(queue_proxy_url(pod, "?sleep=2"))
    assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])
    during = install.ticks(cluster, pod)
    assert during >= before + 3, f"the app did not run while serving: {before} -> {during}"
    until("the app frozen again", lambda: frozen(pod), 30)
    settled = install.ticks(cluster, pod)
    time.sleep(2)
    assert install.ticks(cluster, pod) == settled


def test_3b_through_the_revision_service_and_cluster_dns(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    """The path a Knative ingress takes: the revision's Service (kube-proxy) by its DNS name."""
    url, host = revision_route(cluster, sleeptalker)
    status, body = get(url + "?sleep=0", host=host)
    assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])


def test_4_the_proxy_uses_the_kubelet_projected_token_and_the_daemon_reviews_it(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    pod = sleeptalker
    claims = _token_claims(cluster, pod)
    assert claims["aud"] == [contract.TOKEN_AUDIENCE]
    k8s = claims["kubernetes.io"]
    assert k8s["pod"]["uid"] == pod["metadata"]["uid"]
    assert k8s["node"]["name"] == NODE_NAME  # minted by the kubelet for this node
    assert claims["exp"] - claims["iat"] >= 600
    # The daemon reviewed it through its in-cluster ServiceAccount: its log names this pod.
    logs = cluster.kubectl(
        "logs", "-n", "knative-serving", "-l", "app=freeze-daemon-containerd", "--tail=-1"
    ).stdout
    assert pod["metadata"]["uid"] in logs, logs[-2000:]


def _gone_after_deletion(cluster: Cluster, pod: dict[str, Any], why: str, timeout: float) -> float:
    """Wait until something deletes ``pod`` (within ``timeout``), then until it is gone; how
    long it was Terminating, which must stay within GRACE_BOUND (its grace is 300 s)."""
    name = pod["metadata"]["name"]

    def deleting() -> bool:
        live = pods(cluster, pod["metadata"]["labels"]["serving.knative.dev/service"])
        mine = [p for p in live if p["metadata"]["name"] == name]
        return not mine or "deletionTimestamp" in mine[0]["metadata"]

    until(why, deleting, timeout)
    started = time.monotonic()
    until(
        f"pod {name} gone (never stuck Terminating)", lambda: not _exists(cluster, pod), GRACE_BOUND
    )
    return time.monotonic() - started


def _exists(cluster: Cluster, pod: dict[str, Any]) -> bool:
    proc = cluster.kubectl("get", "pod", "-n", "default", pod["metadata"]["name"], check=False)
    return proc.returncode == 0


def test_6_scale_to_zero_terminates_the_frozen_pod_and_a_request_scales_it_up(
    cluster: Cluster, installed: Path, built: Built
) -> None:
    grace = {"freeze-proxy.knative.dev/grace": "250ms"}
    pod = install.deploy(cluster, install.service("zero", built.refs["sleeptalker"], grace))
    until("the idle app frozen", lambda: frozen(pod), 30)
    took = _gone_after_deletion(cluster, pod, "Knative to scale the revision to zero", 120)
    print(f"scaled to zero: the frozen pod was Terminating for {took:.1f} s")
    url, host = revision_route(cluster, pod)
    status, body = get(url + "?sleep=0", host=host, timeout=60)  # through the activator
    assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])
    assert install.is_ready(ready_pod(cluster, "zero"))
    cluster.kubectl("delete", "ksvc", "zero", "--wait=false")


def test_7a_deleting_a_frozen_service_removes_its_pods_within_the_grace(
    cluster: Cluster, installed: Path, built: Built
) -> None:
    warm = {"autoscaling.knative.dev/min-scale": "1"}
    pod = install.deploy(cluster, install.service("doomed", built.refs["sleeptalker"], warm))
    until("the idle app frozen", lambda: frozen(pod), 30)
    cluster.kubectl("delete", "ksvc", "doomed", "--wait=false")
    took = _gone_after_deletion(cluster, pod, "the pod to be deleted", 30)
    print(f"kubectl delete ksvc: the frozen pod was Terminating for {took:.1f} s")


def _daemon_pods(cluster: Cluster) -> list[dict[str, Any]]:
    listed = cluster.get_json(
        "pods", "-n", install.NAMESPACE, "-l", "app.kubernetes.io/name=freeze-daemon"
    )
    return list(listed["items"])


def _the_one_daemon_pod(cluster: Cluster, not_: str | None = None) -> dict[str, Any] | None:
    """The node's daemon pod, if exactly one (and not named ``not_``)."""
    found = _daemon_pods(cluster)
    one = found[0] if len(found) == 1 else None
    return one if one is not None and one["metadata"]["name"] != not_ else None


def test_8_a_rolling_update_of_the_daemon_under_traffic_fails_no_request(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    """Issue #15's rolling update, as Kubernetes does it: ``kubectl rollout restart`` of the
    DaemonSet while a client calls the app through queue-proxy twice a second (frozen between
    calls: grace 250 ms). The kubelet stops the old daemon pod (it thaws what it froze), then
    starts the new one; no request fails, and the figure is the longest added latency."""
    pod = refresh(cluster, sleeptalker)
    until("the idle app frozen", lambda: frozen(pod), 30)
    old = until("one daemon pod", lambda: _the_one_daemon_pod(cluster), 30)["metadata"]["name"]
    outcomes: list[tuple[float, int, float]] = []  # (started, status, seconds)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _ = get(queue_proxy_url(pod), timeout=30)
            except OSError:
                status = 0
            outcomes.append((started, status, time.monotonic() - started))
            stop.wait(0.5)

    client = threading.Thread(target=traffic, daemon=True)
    client.start()
    try:
        time.sleep(3)
        fault = time.monotonic()
        daemonset = "daemonset/freeze-daemon-containerd"
        cluster.kubectl("rollout", "restart", "-n", install.NAMESPACE, daemonset)
        cluster.kubectl(
            "rollout", "status", "-n", install.NAMESPACE, daemonset, "--timeout=180s",
            timeout=200,
        )  # fmt: skip
        rolled = time.monotonic()
        new = until("only the new daemon pod", lambda: _the_one_daemon_pod(cluster, old), 60)
        time.sleep(3)
    finally:
        stop.set()
        client.join(40)
    failed = [o for o in outcomes if o[1] != 200]
    assert not failed, f"requests failed during the rollout: {failed}"
    before = sorted(s for at, _, s in outcomes if at < fault)
    baseline = before[len(before) // 2]
    during = [s for at, _, s in outcomes if at >= fault]
    figure = write_figure(
        "daemon-rolling-update-node",
        requests=len(outcomes),
        failed=len(failed),
        rollout_s=round(rolled - fault, 1),
        max_added_latency_ms=round(1000 * (max(during) - baseline), 1),
        old_pod=old,
        new_pod=new["metadata"]["name"],
    )
    assert figure["requests"] > 10, figure
    until("frozen again by the new daemon", lambda: frozen(pod), 30)


def test_9_the_daemon_killed_while_the_app_is_frozen_is_restarted_and_the_app_wakes(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    """Issue #15's daemon crash on the real node: SIGKILL to every process of the daemon's
    container while the app is frozen. The kubelet restarts the container; the new daemon
    thaws what the dead one froze before it serves; the next request is answered and the app
    is frozen again. No request is lost: one sent during the outage waits for the new daemon
    (or gets a bounded 503 with its cause)."""
    pod = refresh(cluster, sleeptalker)
    until("the idle app frozen", lambda: frozen(pod), 30)
    daemon = until("one daemon pod", lambda: _the_one_daemon_pod(cluster), 30)
    restarts_before = restarts(daemon)["freeze-daemon"]
    procs = install.freezer_dir(daemon, "freeze-daemon") / "cgroup.procs"
    pids = [int(p) for p in procs.read_text().split()]
    assert pids, "the daemon container has no process"
    killed = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    first, body = get(queue_proxy_url(pod), timeout=60)  # sent at once: the daemon is gone
    waited = time.monotonic() - killed
    assert first == 200 or (first == 503 and b'"cause"' in body), (first, body[-300:])

    def restarted() -> dict[str, Any] | None:
        now = _the_one_daemon_pod(cluster)
        if now is None or restarts(now)["freeze-daemon"] <= restarts_before:
            return None
        return now if install.is_ready(now) else None

    until("the kubelet restarted the daemon", restarted, 90)
    back = time.monotonic() - killed
    status, body = get(queue_proxy_url(pod), timeout=30)
    assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])
    until("frozen again by the restarted daemon", lambda: frozen(pod), 30)
    write_figure(
        "daemon-sigkill-node",
        first_request_status=first,
        first_request_s=round(waited, 2),
        daemon_back_s=round(back, 1),
        left_frozen=0,
    )


def _token_claims(cluster: Cluster, pod: dict[str, Any]) -> dict[str, Any]:
    """The claims of the token file as the proxy's container sees it."""
    token = cluster.kubectl(
        "exec", "-n", "default", pod["metadata"]["name"], "-c", contract.SIDECAR_NAME, "--",
        "python3", "-c", f"print(open({contract.TOKEN_FILE!r}).read())",
    ).stdout.strip()  # fmt: skip
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def test_5_kubelet_probes_keep_the_frozen_pod_ready_and_the_rotated_token_still_wakes_it(
    cluster: Cluster, sleeptalker: dict[str, Any]
) -> None:
    """Proof 5 (at least 3 minutes frozen: Ready, nothing restarted) and the rest of proof 4:
    the kubelet rotates the token (at 80 % of its 600 s, on its next volume sync) and the
    rotated one wakes the app. Placed late in the module so that the wait for the rotation
    overlaps the earlier tests."""
    pod = refresh(cluster, sleeptalker)
    counts = restarts(pod)
    first = _token_claims(cluster, pod)
    until("the idle app frozen", lambda: frozen(pod), 30)
    started = time.monotonic()
    rotate_by = first["iat"] + 0.8 * (first["exp"] - first["iat"]) + 240  # + kubelet's sync
    rotated: dict[str, Any] | None = None
    while time.monotonic() - started < 180 or rotated is None:
        assert time.time() < rotate_by, f"the kubelet did not rotate the token: {first}"
        now = refresh(cluster, pod)
        assert install.is_ready(now), now["status"]
        assert restarts(now) == counts, now["status"]["containerStatuses"]
        assert frozen(pod)
        if rotated is None and (claims := _token_claims(cluster, pod))["iat"] != first["iat"]:
            rotated = claims
        time.sleep(10)
    held = time.monotonic() - started
    print(f"frozen and Ready for {held:.0f} s; the token rotated (iat {rotated['iat']})")
    assert rotated["kubernetes.io"]["pod"]["uid"] == pod["metadata"]["uid"]
    status, body = get(queue_proxy_url(pod))  # the resume authenticates with the new token
    assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])


def test_7b_uninstall_while_frozen_leaves_nothing_frozen_and_the_app_answering(
    cluster: Cluster, installed: Path, sleeptalker: dict[str, Any]
) -> None:
    pod = refresh(cluster, sleeptalker)
    until("the idle app frozen", lambda: frozen(pod), 30)
    cluster.kubectl("delete", "-k", str(installed), "--wait=true", timeout=180)
    until("the app thawed", lambda: install.freezer_state(pod) == "THAWED", 30)
    for _ in range(3):
        status, body = get(queue_proxy_url(pod), timeout=30)
        assert status == 200 and body.endswith(b".. world.\n"), (status, body[-200:])
    assert install.freezer_state(pod) == "THAWED"
