"""Slow and idle clients against the real ``python -m freeze_proxy`` (issue #15): what a client
that opens connections and never finishes a request costs the proxy.

queue-proxy is the proxy's only client in a pod, but anything in the pod (or a broken
queue-proxy) can open connections to it: each must end after the documented timeout or be
refused beyond ``--max-connections``, memory must stay bounded, and a good request is served
meanwhile. Figures: ``make reliability`` (tests/reliability_report.py).
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest

from freeze_proxy.health import HealthPort
from freeze_proxy.probes import Prober
from freeze_proxy.relay import AlwaysAwake
from reliability.procstat import fd_count, rss_kib
from tests.reliability_report import write_figure
from tests.test_no_daemon import app_site, real_proxy, refused_url

pytestmark = pytest.mark.fuzz

# Short limits, so the test waits seconds, not the defaults' minutes.
LIMITS = ("--header-timeout=1s", "--idle-timeout=2s")


async def closed_after(reader: asyncio.StreamReader, within: float) -> tuple[bytes, float]:
    """What the server sent before it closed the connection, and when (``time.monotonic``)."""
    try:
        data = await asyncio.wait_for(reader.read(), within)
    except TimeoutError:
        raise AssertionError(f"the proxy still holds the connection after {within} s") from None
    return data, time.monotonic()


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_idle_and_trickling_clients_are_closed_on_time_and_cost_bounded_memory(
    tmp_path: Path,
) -> None:
    n = 300
    async with (
        app_site() as app_port,
        real_proxy(tmp_path, app_port, refused_url(), "--no-freeze", *LIMITS) as proxy,
    ):
        port = urlsplit(proxy.url).port
        pid = proxy.proc.pid
        assert await get(proxy.url + "/warm") == (200, "hello")
        rss_before, fds_before = rss_kib(pid), fd_count(pid)
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
        trickling = conns[: n // 2]  # a head that never ends: one byte every 100 ms
        started = time.monotonic()

        async def trickle(writer: asyncio.StreamWriter) -> None:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            for _ in range(200):
                if writer.is_closing():
                    return
                writer.write(b"X")
                await asyncio.sleep(0.1)

        tasks = [asyncio.ensure_future(trickle(w)) for _, w in trickling]
        try:
            await asyncio.sleep(0.5)
            fds_held = fd_count(pid)
            rss_held = rss_kib(pid)
            # Served meanwhile, and quickly.
            t0 = time.monotonic()
            assert await get(proxy.url + "/meanwhile") == (200, "hello")
            good_ms = (time.monotonic() - t0) * 1000
            heads = await asyncio.gather(*(closed_after(r, 8) for r, _ in trickling))
            idles = await asyncio.gather(*(closed_after(r, 8) for r, _ in conns[n // 2 :]))
        finally:
            for task in tasks:
                task.cancel()
            for _, writer in conns:
                writer.close()
        assert fds_held >= fds_before + n // 2, "the connections were not even accepted"
        for data, _ in heads:  # cut 1 s after the head's first byte, not kept alive by bytes
            assert data.startswith(b"HTTP/1.1 408 "), data
            assert b"header-timeout" in data, data
        head_s = max(at for _, at in heads) - started
        assert head_s < 3, f"a trickled head was held {head_s:.1f} s (--header-timeout=1s)"
        for data, _ in idles:  # closed without a word after the idle timeout
            assert data == b"", data
        idle_s = min(at for _, at in idles) - started
        assert 1.5 < idle_s < 5, f"idle connections closed after {idle_s:.1f} s (--idle-timeout=2s)"
        await asyncio.sleep(0.3)
        fds_after, rss_after = fd_count(pid), rss_kib(pid)
        assert fds_after <= fds_before + 2, (fds_before, fds_after)
        growth_mib = (rss_held - rss_before) / 1024
        assert growth_mib < 8, f"{n} held connections grew RSS by {growth_mib:.1f} MiB"
        assert await get(proxy.url + "/after") == (200, "hello")
        write_figure(
            "slowloris-proxy",
            connections=n,
            header_timeout_s=1,
            idle_timeout_s=2,
            longest_trickled_head_s=round(head_s, 2),
            first_idle_close_s=round(idle_s, 2),
            good_request_ms=round(good_ms, 1),
            rss_before_kib=rss_before,
            rss_held_kib=rss_held,
            rss_after_kib=rss_after,
            fds_before=fds_before,
            fds_held=fds_held,
            fds_after=fds_after,
        )


async def test_connections_beyond_the_cap_get_503_and_are_closed(tmp_path: Path) -> None:
    cap, n = 50, 80
    async with (
        app_site() as app_port,
        real_proxy(
            tmp_path, app_port, refused_url(), "--no-freeze", f"--max-connections={cap}"
        ) as proxy,
    ):
        port = urlsplit(proxy.url).port
        pid = proxy.proc.pid
        fds_before = fd_count(pid)
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        try:
            await asyncio.sleep(0.3)
            extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n - cap)]
            answers = await asyncio.gather(*(closed_after(r, 5) for r, _ in extra))
            for data, _ in answers:
                assert data.startswith(b"HTTP/1.1 503 "), data
                assert b"max-connections" in data, data
            # Each refusal lingers LINGER (0.5 s) for its client to read the 503, then closes.
            async with asyncio.timeout(3):
                while fd_count(pid) > fds_before + cap + 2:
                    await asyncio.sleep(0.05)
            for _, writer in extra:
                writer.close()
            # One held connection leaves: a good request gets its place.
            held.pop()[1].close()
            await asyncio.sleep(0.2)
            assert await get(proxy.url + "/room") == (200, "hello")
        finally:
            for _, writer in held:
                writer.close()
    warned = [r for r in proxy.log_lines() if "connection limit" in r["msg"]]
    assert len(warned) == 1 and warned[0]["max_connections"] == cap, warned
    write_figure("slowloris-proxy-cap", max_connections=cap, opened=n, refused=n - cap)


async def test_the_health_port_closes_held_connections_and_serves_probes_meanwhile(
    tmp_path: Path,
) -> None:
    """300 connections that never send a byte: each gets 408 after HEALTH_TIMEOUT (2 s)."""
    n = 300
    async with app_site() as app_port, real_proxy(tmp_path, app_port, refused_url()) as proxy:
        port = urlsplit(proxy.health_url).port
        pid = proxy.proc.pid
        await proxy.health()
        rss_before, fds_before = rss_kib(pid), fd_count(pid)
        started = time.monotonic()
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(n)]
        try:
            await asyncio.sleep(0.3)
            rss_held, fds_held = rss_kib(pid), fd_count(pid)
            assert (await proxy.health())["status"] == "ok"
            answers = await asyncio.gather(*(closed_after(r, 8) for r, _ in conns))
        finally:
            for _, writer in conns:
                writer.close()
        for data, _ in answers:
            assert data.startswith(b"HTTP/1.1 408 "), data
        longest = max(at for _, at in answers) - started
        assert longest < 4, f"the health port held a silent connection {longest:.1f} s"
        await asyncio.sleep(0.3)
        assert fd_count(pid) <= fds_before + 2
        growth_mib = (rss_held - rss_before) / 1024
        assert growth_mib < 8, f"{n} held connections grew RSS by {growth_mib:.1f} MiB"
        write_figure(
            "slowloris-proxy-health",
            connections=n,
            longest_held_s=round(longest, 2),
            rss_before_kib=rss_before,
            rss_held_kib=rss_held,
            fds_before=fds_before,
            fds_held=fds_held,
        )


async def test_the_health_port_refuses_connections_beyond_its_cap() -> None:
    stopping = asyncio.Event()
    prober = Prober(AlwaysAwake(), lambda: None, stopping.is_set, lambda: True)
    port = HealthPort(None, stopping, prober, ("127.0.0.1", 1), frozenset())
    port.max_connections = 3
    server = await asyncio.get_running_loop().create_server(port.protocol, "127.0.0.1", 0)
    address = server.sockets[0].getsockname()[:2]
    try:
        held = [await asyncio.open_connection(*address) for _ in range(3)]
        reader, writer = await asyncio.open_connection(*address)
        data, _ = await closed_after(reader, 3)
        assert data.startswith(b"HTTP/1.1 503 ") and b"max-connections" in data, data
        writer.close()
        held[0][1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        data, _ = await closed_after(held[0][0], 3)
        assert data.startswith(b"HTTP/1.1 200 "), data
        assert port.refused_connections == 1
        for _, w in held:
            w.close()
    finally:
        server.close()


def open_files_soft_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.parametrize("room", [True, False], ids=["hard-limit-has-room", "hard-limit-too-low"])
async def test_the_open_files_limit_is_raised_to_fit_max_connections(
    tmp_path: Path, room: bool
) -> None:
    """A container may start with a soft limit of 1024 descriptors (containerd 2.x no longer
    raises it): the proxy raises it to what --max-connections needs, or says it cannot."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if room else 2048
    async with (
        app_site() as app_port,
        real_proxy(
            tmp_path,
            app_port,
            refused_url(),
            "--no-freeze",
            "--max-connections=3000",
            open_files=(1024, hard),
        ) as proxy,
    ):
        assert await get(proxy.url + "/x") == (200, "hello")
        soft = open_files_soft_limit(proxy.proc.pid)
    wanted = 2 * 3000 + 256 + 1024
    assert soft == (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard))
    warned = [r for r in proxy.log_lines() if r["msg"].startswith("RLIMIT_NOFILE")]
    if hard < wanted:
        assert len(warned) == 1 and warned[0]["wanted"] == wanted, warned
    else:
        assert not warned
