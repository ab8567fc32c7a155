"""Row 2b: wake latency with the docker backend (``--runtime docker``) on a real dockerd.

The same measurement as row 2 (bench/wake.py) with Docker Engine in containerd's place: the
sleeptalker app in a cri-dockerd-style pod (testbed.dockerpods) on the test bed's private
dockerd, the real freeze-daemon process with ``--runtime docker`` and a real freeze-proxy
(grace 0) in front of it. Each round: the app frozen, one request through the proxy (→ first
byte), then Docker's own ``POST /containers/{id}/unpause`` alone (the floor every wake stands on)
and a ``pause`` to freeze it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from bench.common import Table, proxy_python
from bench.wake import (
    CPU_CYCLES,
    _cpu_per_cycle,
    _cpu_seconds,
    _get,
    _ms,
    _p,
    _proxy_resumes,
    _wait_proxy_frozen,
)
from testbed import rootfs, tokens
from testbed.docker import Dockerd, missing_prerequisites, pids_with_arg
from testbed.dockerpods import DockerContainer, DockerPod, DockerPods, sleeper
from testbed.processes import free_port
from testbed.stack import SLEEPTALKER, Proxy, program, wait_http

BENCH = "wake_docker"
CONTAINER = "user-container"
SETTLE = 0.02
APP_IMAGE = "freeze.test/sleeptalker-python:1"


def run(table: Table, quick: bool = False) -> None:
    why = missing_prerequisites()
    if why:
        table.add(BENCH, "all", result=f"skipped: {why}")
        return
    asyncio.run(_run(table, rounds=20 if quick else 200))


def _app_image(engine: Dockerd) -> str:
    """The row-2 rootfs (python3 + aiohttp) as a Docker image; sleeptalker is mounted in."""
    if not engine.has_image(APP_IMAGE):
        tar = rootfs.rootfs_tar()
        with open(tar, "rb") as data:
            proc = subprocess.run(
                [engine.cli, "import", "-", APP_IMAGE],
                stdin=data,
                env=engine.env(),
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"docker import of {tar} failed: {proc.stderr[-2000:]}")
    return APP_IMAGE


@contextlib.asynccontextmanager
async def _daemon(
    engine: Dockerd, work: Path, jwks: Path
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    args = [
        "daemon",
        f"--listen=127.0.0.1:{port}",
        "--runtime=docker",
        f"--docker-socket={engine.socket}",
        "--no-token-review",
        f"--jwks-file={jwks}",
        f"--issuer={tokens.DEFAULT_ISSUER}",
        "--freeze-rate=0",  # cycles faster than a pod would
    ]
    async with program(args, work / "daemon.log") as proc:
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/healthz")
        yield url, proc


@contextlib.asynccontextmanager
async def _proxy(work: Path, app_port: int, daemon_url: str, token: Path) -> AsyncIterator[Proxy]:
    port, health = free_port(), free_port()
    log_file = work / f"proxy-{port}.log"
    args = [
        "freeze_proxy",
        f"--listen=127.0.0.1:{port}",
        f"--health-listen=127.0.0.1:{health}",
        f"--upstream=http://127.0.0.1:{app_port}",
        f"--daemon-url={daemon_url}",
        f"--token-file={token}",
        f"--container={CONTAINER}",
        "--grace=0",
    ]
    async with program(args, log_file, proxy_python()) as proc:
        health_url = f"http://127.0.0.1:{health}/healthz"
        await wait_http(health_url)
        yield Proxy(f"http://127.0.0.1:{port}", health_url, log_file, proc)


def _engine_cpu(engine: Dockerd, daemon_pid: int) -> dict[str, float]:
    """CPU seconds so far of the engine's processes (dockerd, the containerd it manages: every
    process with the engine's private dir in its arguments) and of its shims (with runc)."""
    engine_s = shims_s = 0.0
    for pid in pids_with_arg(str(engine.base)):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith("containerd-shim"):
            shims_s += _cpu_seconds(pid, children=True)
        else:
            engine_s += _cpu_seconds(pid, children=False)
    return {"dockerd": engine_s, "shims": shims_s, "daemon": _cpu_seconds(daemon_pid, False)}


async def _docker_call(docker: aiohttp.ClientSession, path: str) -> float:
    started = time.perf_counter()
    async with docker.post(f"http://docker{path}") as r:
        body = await r.read()
    took = _ms(started)
    if r.status >= 400:
        raise RuntimeError(f"docker POST {path} answered {r.status}: {body[:300]!r}")
    return took


async def _wait_paused(pod: DockerPod, limit: float = 20.0) -> None:
    deadline = time.monotonic() + limit
    while pod.freezer_state(CONTAINER) != "FROZEN":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{CONTAINER} not frozen within {limit:.0f} s")
        await asyncio.sleep(0.002)


async def _run(table: Table, rounds: int) -> None:
    s: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="freeze-bench-docker-") as tmp, Dockerd() as engine:
        work = Path(tmp)
        image = _app_image(engine)
        pods = DockerPods(engine)
        try:
            app_port = free_port()
            app = DockerContainer(
                CONTAINER,
                ("python3", "/app/app.py"),
                image=image,
                env={"PORT": str(app_port), "HOST": "127.0.0.1", "TICK_INTERVAL": "0.5"},
                mounts={str(SLEEPTALKER): "/app/app.py"},
            )
            pod = pods.create_pod(
                [app, sleeper("queue-proxy")], name="wake", namespace="demo", network="host"
            )
            await wait_http(f"http://127.0.0.1:{app_port}/?sleep=0")
            key = tokens.new_rsa_key()
            jwks = tokens.write_jwks(work / "jwks.json", key)
            token = work / "token"
            token.write_text(
                tokens.mint_token(
                    key, pod_uid=pod.uid, pod_name=pod.name, namespace=pod.namespace, lifetime=3600
                )
            )
            cid = pod.container_id(CONTAINER)
            async with (
                _daemon(engine, work, jwks) as (daemon_url, daemon),
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(engine.socket)),
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as docker,
                _proxy(work, app_port, daemon_url, token) as proxy,
            ):
                await _wait_paused(pod)
                base = int((await proxy.health())["pauses"])
                for i in range(rounds):
                    await _wait_paused(pod)
                    await asyncio.sleep(SETTLE)
                    seen, ttfb, total = await _get(session, proxy.url)
                    s["wake_seen"].append(seen)
                    s["wake_ttfb"].append(ttfb)
                    s["wake_total"].append(total)
                    await _wait_proxy_frozen(session, proxy, pauses=base + i + 1)
                    # Docker's unpause alone, then its pause: the app ends frozen as the proxy
                    # believes it is.
                    await asyncio.sleep(SETTLE)
                    s["unpause"].append(await _docker_call(docker, f"/containers/{cid}/unpause"))
                    await asyncio.sleep(SETTLE)
                    s["pause"].append(await _docker_call(docker, f"/containers/{cid}/pause"))
                cpu = await _cpu_per_cycle(
                    session,
                    daemon_url,
                    token.read_text(),
                    CPU_CYCLES if rounds >= 200 else 20,
                    lambda: _engine_cpu(engine, daemon.pid),
                )
            proxy_resume = _proxy_resumes(proxy.log_file)[:rounds]
        finally:
            pods.close()
    add = table.add
    add(
        BENCH,
        "frozen app: request → app has it",
        **_p(s["wake_seen"]),
        note="--runtime docker; the app's X-Received-At",
    )
    add(
        BENCH,
        "frozen app: request → first byte",
        **_p(s["wake_ttfb"]),
        note="via freeze-proxy (grace 0) → freeze-daemon → dockerd",
    )
    add(BENCH, "frozen app: request → full response", **_p(s["wake_total"]))
    add(BENCH, "proxy's resume call (its log)", **_p(proxy_resume))
    add(BENCH, "docker unpause alone (raw API)", **_p(s["unpause"]))
    add(BENCH, "docker pause alone (raw API)", **_p(s["pause"]))
    add(
        BENCH,
        "docker: node CPU per pause+resume",
        **{f"{k}_ms": round(v, 3) for k, v in cpu.items()},
        total_ms=round(sum(cpu.values()), 3),
        note="dockerd + its containerd + shims (with runc) + daemon, from /proc",
    )
