"""Multi-container pods through the real daemon on real containerd + runc (test-bed pods): the
list the webhook decides is frozen whole or not at all, and the request path of an
Istio-shaped Knative pod stays awake."""

from __future__ import annotations

import aiohttp
import pytest

from daemon._proto import cri_pb2
from testbed.pods import MakePod, sleeper
from testbed.tokens import SigningKey
from tests.knative_pods import istio_injected, knative_pod, queue_proxy, user_container
from tests.pod_checks import USER, eventually, log_grows, log_is_quiet
from tests.test_daemon_containerd import daemon_url, http, key, post, token  # noqa: F401
from webhook.containers import freeze_list
from webhook.mutation import exec_probes

pytestmark = pytest.mark.containerd


def query(containers: list[str]) -> str:
    return "?" + "&".join(f"container={c}" for c in containers)


async def test_a_container_gone_since_the_lookup_fails_the_freeze_and_the_rest_is_thawed_back(
    make_pod: MakePod,
    http: aiohttp.ClientSession,  # noqa: F811
    key: SigningKey,  # noqa: F811
) -> None:
    """A real partial failure: the daemon knows the pod's containers from a lookup (cached for
    up to a minute, as every call does), then the sidecar's process exits (crashed; here CRI's
    StopContainer, as kubelet stops it) and containerd deletes its task. The next freeze pauses
    user-container, while the sidecar's Pause answers NOT_FOUND; the fresh lookup finds it no
    longer running. All-or-none: user-container is thawed back (its freezer THAWED, its log
    growing) and the answer is 502 naming the sidecar — before, it stayed FROZEN behind a 404
    while the proxy believed the app awake."""
    pod = await make_pod(queue_proxy=True, extra=[sleeper("sidecar")])
    both = query([USER, "sidecar"])
    status, body = await post(http, "/freeze" + both, token(key, pod))
    assert (status, body["containers"]) == (200, [USER, "sidecar"]), body
    assert pod.freezer_state(USER) == pod.freezer_state("sidecar") == "FROZEN"
    status, body = await post(http, "/thaw" + both, token(key, pod))
    assert status == 200, body

    await pod.client.cri.StopContainer(
        cri_pb2.StopContainerRequest(container_id=pod.container_id("sidecar"), timeout=0)
    )
    status, body = await post(http, "/freeze" + both, token(key, pod))
    assert status == 502, body
    assert body["container"] == "sidecar" and "'sidecar'" in body["error"], body
    assert body["thawed_back"] == [USER] and "thawed back" in body["error"], body
    assert pod.freezer_state(USER) == "THAWED"
    assert await pod.task_status(USER) == "RUNNING"
    assert await log_grows(pod)
    assert pod.freezer_state("queue-proxy") == "THAWED"

    # The app alone still freezes, and the thaw of the pair thaws what is left (200).
    status, _ = await post(http, "/freeze" + query([USER]), token(key, pod))
    assert status == 200 and pod.freezer_state(USER) == "FROZEN"
    status, body = await post(http, "/thaw" + both, token(key, pod))
    assert (status, body["containers"]) == (200, [USER]), body
    assert await log_grows(pod)


async def test_an_istio_shaped_knative_pod_keeps_its_request_path_awake(
    make_pod: MakePod,
    http: aiohttp.ClientSession,  # noqa: F811
    key: SigningKey,  # noqa: F811
) -> None:
    """Containers named as in an Istio-injected Knative pod (tests/knative_pods.istio_injected,
    built by hand: no Istio here), busybox stand-ins: the webhook's list freezes user-container
    only; istio-proxy, queue-proxy and freeze-proxy stay THAWED. The daemon's own default (no
    ?container=) leaves istio-proxy alone too, and refuses to be asked for it."""
    spec = istio_injected(knative_pod([user_container(), queue_proxy()]))
    webhooks = freeze_list(spec, USER, "queue-proxy", exec_probes).containers
    assert webhooks == [USER]
    pod = await make_pod(queue_proxy=True, extra=[sleeper("istio-proxy"), sleeper("freeze-proxy")])
    assert await eventually(lambda: len(pod.log_lines(USER)) >= 2), "ticker never logged"
    awake = ("istio-proxy", "queue-proxy", "freeze-proxy")

    status, body = await post(http, "/freeze" + query(webhooks), token(key, pod))
    assert (status, body["containers"]) == (200, [USER]), body
    assert pod.freezer_state(USER) == "FROZEN" and await log_is_quiet(pod)
    assert [pod.freezer_state(c) for c in awake] == ["THAWED"] * 3
    status, _ = await post(http, "/thaw" + query(webhooks), token(key, pod))
    assert status == 200 and await log_grows(pod)

    status, body = await post(http, "/freeze", token(key, pod))
    assert (status, body["containers"]) == (200, [USER]), body
    assert [pod.freezer_state(c) for c in awake] == ["THAWED"] * 3
    await post(http, "/thaw", token(key, pod))

    status, body = await post(http, "/freeze" + query([USER, "istio-proxy"]), token(key, pod))
    assert status == 400 and "never frozen" in body["error"], body
    assert pod.freezer_state("istio-proxy") == "THAWED"
