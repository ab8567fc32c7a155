"""A pod flooding freeze-daemon with bad tokens, the daemon checking tokens with the real
kube-apiserver as shipped (issue #15): the flood must neither starve a good pod's wake nor turn
into API server load.

The flood (bench/daemon_flood.py ``hostile``, its own process): random ``kid``s (each an unknown
key: a JWKS re-fetch if nothing limited it), tokens signed by a stranger's key under the API
server's own ``kid``, 1 MB tokens, and Knative-protocol bodies trickled a byte at a time. The
good pod is an API pod with a CRI twin of the same uid, its token a pod-bound TokenRequest
token; every wake is a real thaw on containerd. ``FREEZE_FLOOD_SECONDS`` sets the flood's length
(10 s here; ``make reliability`` may run the bench's 30 s).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from bench.daemon_flood import apiserver_flood
from testbed.apiserver import ApiServer
from testbed.containerd import Containerd
from testbed.pods import PodClient
from tests.reliability_report import write_figure

pytestmark = [pytest.mark.apiserver, pytest.mark.containerd, pytest.mark.fuzz]

SECONDS = float(os.environ.get("FREEZE_FLOOD_SECONDS", "10"))
KEY_REFETCH_INTERVAL = 10.0  # daemon.auth.KeyCache's default
REVIEW_CACHE_TTL = 30.0  # the daemon's --review-cache-ttl default


async def test_a_bad_token_flood_neither_starves_a_wake_nor_loads_the_api_server(
    apiserver: ApiServer, containerd: Containerd, tmp_path: Path
) -> None:
    pods = PodClient(containerd)
    try:
        got = await apiserver_flood(apiserver, containerd, pods, tmp_path, SECONDS)
    finally:
        for pod in list(pods.pods):
            await pod.remove()
        await pods.close()
    figures = dict(got)
    answers = figures.pop("flood_answers")
    write_figure(
        "bad-token flood vs kube-apiserver",
        fuzz="bad-token flood vs kube-apiserver",
        **figures,
        **{f"flood_{k}": v for k, v in answers.items()},
    )

    # The flood was real: thousands of requests of every kind were answered or cut.
    assert got["flood_requests"] >= 100 * SECONDS / 10, got
    assert any(k.startswith("slow_body_") for k in answers), answers
    assert answers.get("huge_reset", 0) + answers.get("400", 0) + answers.get("431", 0) > 0

    # API server requests bounded by a small constant, not by the flood: at most one key-set
    # fetch per refetch interval (random kids) and the good token's own review when its cache
    # entry expires; no TokenReview for any bad token.
    fetch_bound = math.ceil(SECONDS / KEY_REFETCH_INTERVAL) + 1
    assert got["jwks_fetches"] <= fetch_bound, got
    assert got["token_reviews"] <= math.ceil(SECONDS / REVIEW_CACHE_TTL) + 1, got
    assert got["apiserver_tokenreviews"] <= got["token_reviews"], got

    # The good pod's wakes are not starved.
    assert got["wakes"] >= SECONDS, got  # at least one a second went through
    assert got["p99_ms"] < 100, got
    assert got["daemon_rss_mib_max"] - got["daemon_rss_mib_before"] < 50, got
