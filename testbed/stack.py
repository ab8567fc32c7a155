"""The whole freeze path on one machine: containerd, a pod, freeze-daemon and freeze-proxy.

Shared by the demo, the end-to-end tests and the benchmarks so each builds the same real stack:
a private containerd, pods made through CRI like kubelet makes them, the real ``freeze-daemon``
process (authenticating locally minted, projected-token-shaped JWTs against a JWKS file) and real
``freeze-proxy`` processes in front of the apps.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from testbed import oci, rootfs, tokens
from testbed.containerd import Containerd
from testbed.pods import ContainerSpec, Pod, PodClient

from .processes import free_port

REPO = Path(__file__).resolve().parent.parent
SLEEPTALKER = REPO / "examples" / "sleeptalker" / "app.py"
SLEEPTALKER_IMAGE = "freeze.test/sleeptalker:1"


async def wait_http(url: str, limit: float = 60.0) -> None:
    """Return once ``url`` answers any HTTP status."""
    deadline = time.monotonic() + limit
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                    await r.read()
                    return
            except (aiohttp.ClientError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer within {limit:.0f} s") from None
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def program(
    args: Sequence[str], log_file: Path, python: str = sys.executable, cwd: Path | None = None
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``python -m <args>`` as a child, logging to ``log_file``; SIGTERM (then KILL) at exit.

    ``cwd``: run the code of another checkout (``python -m`` imports from the working directory
    first), e.g. a benchmark's ``--before`` tree."""
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(
            [python, "-m", *args], stderr=log, stdout=log, start_new_session=True, cwd=cwd
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            for _ in range(300):
                if proc.poll() is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                proc.kill()
                proc.wait()


@dataclass
class Proxy:
    """A running freeze-proxy: where to send requests and where to read its state."""

    url: str
    health_url: str
    log_file: Path
    proc: subprocess.Popen[bytes]

    async def health(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(self.health_url) as r:
            body: dict[str, Any] = await r.json()
            return body


class Stack:
    """containerd + freeze-daemon, ready to host pods and put freeze-proxies in front of them."""

    def __init__(self, containerd: Containerd, client: PodClient, work: Path) -> None:
        self.containerd = containerd
        self.client = client
        self.work = work
        self.key = tokens.new_rsa_key()
        self.jwks = tokens.write_jwks(work / "jwks.json", self.key)
        self.daemon_port = free_port()
        self.daemon_url = f"http://127.0.0.1:{self.daemon_port}"
        self.daemon_log = work / "daemon.log"
        self.daemon_proc: subprocess.Popen[bytes] | None = None  # the current daemon process

    def daemon_args(self, *extra: str) -> list[str]:
        return [
            "daemon",
            f"--listen=127.0.0.1:{self.daemon_port}",
            f"--containerd-socket={self.containerd.socket}",
            "--no-token-review",
            f"--jwks-file={self.jwks}",
            f"--issuer={tokens.DEFAULT_ISSUER}",
            *extra,
        ]

    @contextlib.asynccontextmanager
    async def daemon(self, *extra: str) -> AsyncIterator[subprocess.Popen[bytes]]:
        """A freeze-daemon process on the stack's port, serving once this yields; SIGTERM at
        exit unless a test stopped or killed it first (then a new one may be started)."""
        async with program(self.daemon_args(*extra), self.daemon_log) as proc:
            self.daemon_proc = proc
            await wait_http(f"{self.daemon_url}/healthz")
            yield proc

    @contextlib.asynccontextmanager
    async def extra_daemon(
        self, *extra: str, cwd: Path | None = None
    ) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
        """Another freeze-daemon on the same containerd and keys, with other flags (e.g.
        ``--runtime=cgroup``) or other code (``cwd``), on a free port; yields (URL, process)."""
        port = free_port()
        args = [*self.daemon_args(*extra), f"--listen=127.0.0.1:{port}"]  # the last one wins
        async with program(args, self.work / f"daemon-{port}.log", cwd=cwd) as proc:
            url = f"http://127.0.0.1:{port}"
            await wait_http(f"{url}/healthz")
            yield url, proc

    def token_file(self, pod: Pod, lifetime: int = 3600) -> Path:
        """Write the pod's projected-token-shaped JWT (audience freeze) where a proxy reads it."""
        path = self.work / f"token-{pod.uid}"
        path.write_text(
            tokens.mint_token(
                self.key,
                pod_uid=pod.uid,
                pod_name=pod.name,
                namespace=pod.namespace,
                lifetime=lifetime,
            )
        )
        return path

    def sleeptalker_image(self) -> str:
        """Build (cached) and import the sleeptalker image: a Debian rootfs with python3."""
        root = rootfs.python_rootfs()
        tar = oci.build_image_tar(
            root,
            SLEEPTALKER_IMAGE,
            self.work / "sleeptalker.tar",
            ["python3", "/app/app.py"],
            files={"/app/app.py": SLEEPTALKER},
        )
        oci.import_image(self.containerd.socket, tar)
        return SLEEPTALKER_IMAGE

    async def sleeptalker_pod(
        self, name: str = "sleeptalker", tick: float = 0.5, extra: Sequence[ContainerSpec] = ()
    ) -> tuple[Pod, int]:
        """A pod whose user-container is sleeptalker on a free host port; waits until it serves."""
        port = free_port()
        spec = ContainerSpec(
            "user-container",
            command=["python3", "/app/app.py"],
            image=SLEEPTALKER_IMAGE,
            env={"PORT": str(port), "HOST": "127.0.0.1", "TICK_INTERVAL": str(tick)},
        )
        pod = await self.client.create_pod([spec, *extra], name=name, namespace="demo")
        await wait_http(f"http://127.0.0.1:{port}/?sleep=0")
        return pod, port

    @contextlib.asynccontextmanager
    async def proxy(
        self,
        pod: Pod,
        app_port: int,
        *extra: str,
        python: str = sys.executable,
        daemon_url: str | None = None,
        cwd: Path | None = None,
    ) -> AsyncIterator[Proxy]:
        """A freeze-proxy process in front of ``app_port`` for ``pod`` (calling the stack's
        daemon unless ``daemon_url`` names another; the code in ``cwd`` if given); stopped
        with SIGTERM."""
        port, health = free_port(), free_port()
        log_file = self.work / f"proxy-{port}.log"
        args = [
            "freeze_proxy",
            f"--listen=127.0.0.1:{port}",
            f"--health-listen=127.0.0.1:{health}",
            f"--upstream=http://127.0.0.1:{app_port}",
            f"--daemon-url={daemon_url or self.daemon_url}",
            f"--token-file={self.token_file(pod)}",
            "--container=user-container",
            *extra,
        ]
        async with program(args, log_file, python, cwd) as proc:
            health_url = f"http://127.0.0.1:{health}/healthz"
            await wait_http(health_url)
            yield Proxy(f"http://127.0.0.1:{port}", health_url, log_file, proc)


@contextlib.asynccontextmanager
async def stack(
    work: Path | None = None, keep_work: bool = False, daemon_args: Sequence[str] = ()
) -> AsyncIterator[Stack]:
    """Start containerd and freeze-daemon; tear everything down (pods, shims, cgroups) at exit."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="freeze-stack-")) if work is None else work
    containerd = Containerd(work / "containerd").start()
    client = PodClient(containerd)
    try:
        st = Stack(containerd, client, work)
        async with st.daemon(*daemon_args):
            yield st
    finally:
        await client.close()
        containerd.stop()
        if own and not keep_work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
