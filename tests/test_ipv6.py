"""IPv6 and dual-stack: the real proxy and daemon on ``::1`` and on every address family.

Kubernetes gives a pod on an IPv6 (or dual-stack) cluster an IPv6 ``status.hostIP``: the daemon
URL built from it needs brackets, and the proxy and the daemon must listen where the pod's and
node's traffic arrives. A wildcard listen address (``:9999``, ``0.0.0.0:9999``, ``[::]:9999``)
listens on every address family the host has, as Go's ``net.Listen`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from freeze_proxy.__main__ import parse_args
from freeze_proxy.addresses import bind_host, host_port
from testbed.processes import stop, wait_listening
from testbed.tokens import DEFAULT_ISSUER, mint_token, new_rsa_key, write_jwks
from tests.proxy_harness import free_port
from tests.test_no_daemon import app_site, real_proxy

ROOT = Path(__file__).resolve().parent.parent
POD: dict[str, Any] = {"pod_uid": "6666-0000", "pod_name": "v6-1", "namespace": "shop"}

pytestmark = pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 on this host")


def test_the_default_daemon_url_brackets_an_ipv6_host_ip() -> None:
    assert parse_args([], env={"HOST_IP": "fd00::2"}).daemon_url == "http://[fd00::2]:9696"
    assert parse_args([], env={"HOST_IP": "10.0.0.7"}).daemon_url == "http://10.0.0.7:9696"


def test_wildcards_listen_on_every_family_and_addresses_on_themselves() -> None:
    for wildcard in ("", "0.0.0.0", "::"):
        assert bind_host(wildcard) is None
    assert bind_host("::1") == "::1"
    assert bind_host("127.0.0.1") == "127.0.0.1"
    assert host_port("::1", 9696) == "[::1]:9696"
    assert host_port("10.0.0.7", 9696) == "10.0.0.7:9696"


@contextlib.contextmanager
def real_daemon(tmp_path: Path, listen: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m daemon`` with local keys and no containerd (its calls answer 502)."""
    pytest.importorskip("daemon.runtimes.containerd")
    key = new_rsa_key()
    (tmp_path / "token").write_text(mint_token(key, **POD))
    with open(tmp_path / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "daemon",
                f"--listen={listen}",
                "--no-token-review",
                f"--jwks-file={write_jwks(tmp_path / 'jwks.json', key)}",
                f"--issuer={DEFAULT_ISSUER}",
                f"--containerd-socket={tmp_path / 'no-containerd.sock'}",
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=log,
        )
    try:
        wait_listening(proc, "::1", port, "freeze-daemon", tmp_path / "daemon.log")
        yield proc
    finally:
        stop(proc)


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        body: dict[str, Any] = await r.json()
        return r.status, body


async def test_proxy_and_daemon_on_every_family_and_the_proxy_calls_the_daemon_over_ipv6(
    tmp_path: Path,
) -> None:
    daemon_port = free_port()
    with real_daemon(tmp_path, f":{daemon_port}", daemon_port):
        for host in ("127.0.0.1", "[::1]"):  # the daemon listens on both families
            assert (await get_json(f"http://{host}:{daemon_port}/healthz"))[0] == 200
        async with (
            app_site() as app_port,
            real_proxy(
                tmp_path,
                app_port,
                f"http://[::1]:{daemon_port}",
                "--grace=0",
                host="",
                connect="::1",
                token=(tmp_path / "token").read_text(),
            ) as proxy,
        ):
            health: dict[str, Any] = {}

            async def answered() -> bool:
                nonlocal health
                health = (await get_json(proxy.health_url))[1]
                return health["daemon"] == "reachable"

            deadline = time.monotonic() + 10
            while not await answered():  # the daemon answered the pause over [::1]
                assert time.monotonic() < deadline, (health, proxy.log_file.read_text())
                await asyncio.sleep(0.02)
            assert health["pause_failures"] >= 1 and health["state"] == "awake", health
            port = proxy.url.rsplit(":", 1)[1]
            health_port = proxy.health_url.rsplit(":", 1)[1].split("/")[0]
            for host in ("127.0.0.1", "[::1]"):  # the proxy listens on both families
                async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/x") as r:
                    assert r.status == 200 and await r.text() == "hello"
                assert (await get_json(f"http://{host}:{health_port}/healthz"))[0] == 200
    assert "freeze failed" in (tmp_path / "daemon.log").read_text()  # it was our call


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace")
def test_on_an_ipv4_only_host_the_wildcard_listens_on_ipv4(tmp_path: Path) -> None:
    """In a network namespace with IPv6 disabled, the real proxy starts on its wildcard defaults
    and serves /healthz over IPv4."""
    script = (
        "set -e; ip link set lo up; "
        "for c in all default lo; do sysctl -qw net.ipv6.conf.$c.disable_ipv6=1; done; "
        f"{sys.executable} -m freeze_proxy --no-freeze --listen=:19999 --health-listen=:19998 "
        f"--token-file={tmp_path / 'token'} 2>{tmp_path / 'proxy.log'} & pid=$!; "
        "for i in $(seq 200); do "
        "  if curl -sf http://127.0.0.1:19998/healthz; then kill $pid; wait $pid; exit 0; fi; "
        "  sleep 0.05; "
        "done; kill $pid; exit 1"
    )
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    log = (tmp_path / "proxy.log").read_text()
    assert done.returncode == 0, (done.stdout, done.stderr, log)
    assert '"status": "ok"' in done.stdout
    assert '"msg": "stopped"' in log
