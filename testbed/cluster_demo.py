"""``make demo ARGS=--cluster``: the same demo, installed the way a Knative operator installs it.

Our four images built from the Dockerfiles (private dockerd), a real single-node Kubernetes with
Knative Serving (:mod:`testbed.cluster`), ``kubectl apply -k`` of config/ with those images
(:mod:`testbed.install`), then two Knative Services of sleeptalker: one opted out
(``freeze-proxy.knative.dev/enabled: "false"``) for the baseline, and the shipped example,
mutated by our webhook. Requests go through queue-proxy (the pod IP's port 8012, where the
activator or an ingress sends them). The seed project's "sleeptalker on minikube with
containerd", without minikube.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from . import images, install
from .cluster import Cluster
from .demo import (
    CONTAINER,
    Summary,
    Timeline,
    _idle,
    _progress,
    _requests,
    _resume_times,
    until_signalled,
)
from .docker import Dockerd

REGISTRY = "freeze-demo.local"
TAG = "demo"


class KubePod:
    """A Knative pod as the timeline reads it: ``kubectl logs`` and the container's cgroup."""

    def __init__(self, cluster: Cluster, pod: dict[str, Any]) -> None:
        self.cluster, self.pod = cluster, pod

    def log_lines(self, container_name: str) -> list[str]:
        proc = self.cluster.kubectl(
            "logs", "-n", "default", self.pod["metadata"]["name"], "-c", container_name
        )
        return proc.stdout.splitlines()

    def cpu_usage_seconds(self, container_name: str) -> float:
        return install.cpu_seconds(self.pod, container_name)

    def frozen(self) -> bool:
        return install.freezer_state(self.pod, CONTAINER) == "FROZEN"

    @property
    def ip(self) -> str:
        return str(self.pod["status"]["podIP"])


async def _wait_frozen(pod: KubePod, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not pod.frozen():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the app was not frozen within {timeout} s")
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> Summary:
    work = Path(tempfile.mkdtemp(prefix="freeze-demo-cluster-"))
    try:
        return await _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _run(args: argparse.Namespace, work: Path) -> Summary:
    summary = Summary(idle_seconds=args.idle)
    done = _progress("building our four images with their Dockerfiles (private dockerd)")
    with Dockerd() as engine:
        built = images.build(engine, REGISTRY, TAG)
        tar = built.save(list(images.IMAGES), work / "images.tar")
        done(", ".join(built.refs.values()))
    done = _progress(
        "starting a single-node Kubernetes (kubelet on containerd, CNI, kube-proxy, CoreDNS) "
        "with Knative Serving"
    )
    with Cluster(images=[tar], skip_tag_resolution=[REGISTRY]) as cluster:
        done(f"KUBECONFIG={cluster.kubeconfig}")
        assert cluster.containerd is not None
        done = _progress("kubectl apply -k config/ (with the local images)")
        kustomization = install.overlay(work / "overlay", built.refs, cluster.containerd.socket)
        install.install(cluster, kustomization)
        done("freeze-daemon and freeze-webhook Ready")

        done = _progress("a Knative Service of sleeptalker opted out of freeze-proxy (baseline)")
        plain = KubePod(
            cluster,
            install.deploy(
                cluster,
                install.service(
                    "sleeptalker-plain",
                    built.refs["sleeptalker"],
                    {"freeze-proxy.knative.dev/enabled": "false"},
                ),
            ),
        )
        done(plain.pod["metadata"]["name"])
        started = time.monotonic()
        print(f"\n• the app idle WITHOUT freeze-proxy for {args.idle:.0f} s", flush=True)
        timeline = Timeline(plain, None, started)
        summary.baseline_cpu_s, summary.baseline_ticks = await _idle(timeline, "idle", args.idle)
        cluster.kubectl("delete", "ksvc", "sleeptalker-plain", "--wait=false")

        done = _progress(
            "kubectl apply -f config/example/sleeptalker.yaml (mutated by our webhook)"
        )
        pod = KubePod(cluster, install.deploy(cluster, install.example(built.refs["sleeptalker"])))
        await _wait_frozen(pod)
        done(f"{pod.pod['metadata']['name']}: the app is frozen")
        health = f"http://{pod.ip}:9998/healthz"
        url = f"http://{pod.ip}:8012"
        timeline = Timeline(pod, health, started)
        print(f"\n• the app idle WITH freeze-proxy for {args.idle:.0f} s", flush=True)
        summary.frozen_cpu_s, summary.frozen_ticks = await _idle(timeline, "frozen", args.idle)

        print(f"\n• {args.requests} requests through queue-proxy, each taking 1 s", flush=True)
        await _requests(summary, timeline, url, args.requests, lambda: _wait_frozen(pod))
        counters = json.loads(install.get(health)[1])
        summary.pauses, summary.resumes = counters["pauses"], counters["resumes"]
        summary.resume_ms = _resume_times(pod.log_lines("freeze-proxy"))
        if args.keep:
            await _keep(cluster, pod)
        done = _progress("tearing down (cluster, pods, iptables, cgroups, bridge, sysctls)")
    done("nothing left behind")
    return summary


async def _keep(cluster: Cluster, pod: KubePod) -> None:
    name = pod.pod["metadata"]["name"]
    print(
        "\nLeft running. Try it by hand (Ctrl-C tears everything down):\n"
        f"  export KUBECONFIG={cluster.kubeconfig}\n"
        f"  curl 'http://{pod.ip}:8012/?sleep=2'\n"
        f"  kubectl logs -f {name} -c user-container      # the app's ticks\n"
        f"  kubectl logs -f {name} -c freeze-proxy\n"
        f"  cat {install.freezer_dir(pod.pod)}/freezer.state",
        flush=True,
    )
    await until_signalled()
