"""The sleeptalker example app, run as a real process.

Every behaviour test runs twice:

* ``host``   — ``examples/sleeptalker/app.py`` with this interpreter (aiohttp 3.14 here);
* ``chroot`` — the same file under ``chroot`` into the cached Debian bookworm rootfs from
  ``testbed.rootfs`` (python3.11 + Debian's aiohttp 3.8), marked ``containerd``. It needs root and
  is skipped when the rootfs cannot be built. The first run on a machine builds the rootfs with
  debootstrap: that takes minutes (cold), later runs reuse the cache under /var/cache/freeze-proxy.
  The app is fed to the chroot's python3 on stdin, so the shared cached tree is never modified;
  chroot shares the host network, so the app is reached on loopback.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from testbed.processes import free_port

APP = Path(__file__).resolve().parent.parent / "examples" / "sleeptalker" / "app.py"
TICK = 0.2
FIRST = "Hello, this request will take two seconds..\n"
LAST = ".. world.\n"
TICK_RE = re.compile(r"^tick (\d+) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)$")


@dataclass
class Output:
    """Lines of a process's stdout, each with the monotonic time it was read."""

    lines: list[tuple[float, str]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False

    def pump(self, stream: Iterator[str]) -> None:
        for raw in stream:
            with self.cond:
                self.lines.append((time.monotonic(), raw.rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> tuple[int, float, str]:
        """The first line at index >= start matching ``pattern``: (index, time read, line)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(self.lines):
                    t, line = self.lines[i]
                    if rx.search(line):
                        return i, t, line
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    got = "\n".join(line for _, line in self.lines[-20:])
                    raise AssertionError(f"no line matching {pattern!r}; last lines:\n{got}")
                self.cond.wait(left)

    def snapshot(self) -> list[tuple[float, str]]:
        with self.cond:
            return list(self.lines)


@dataclass
class Running:
    proc: subprocess.Popen[str]
    out: Output
    base: str

    def terminate_and_wait(self, timeout: float) -> tuple[int, float]:
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - started


@pytest.fixture(scope="session")
def cached_rootfs() -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root (debootstrap / chroot)")
    if shutil.which("chroot") is None:
        pytest.skip("no chroot binary")
    from testbed.rootfs import RootfsError, python_rootfs

    try:
        return python_rootfs()  # cold: minutes (debootstrap); warm: instant
    except RootfsError as exc:
        pytest.skip(f"rootfs cannot be built here: {exc}")


@pytest.fixture(params=["host", pytest.param("chroot", marks=pytest.mark.containerd)])
def flavour(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def app(flavour: str, request: pytest.FixtureRequest) -> Iterator[Running]:
    port = free_port()
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "TICK_INTERVAL": str(TICK),
    }
    if flavour == "host":
        cmd = [sys.executable, str(APP)]
        stdin = subprocess.DEVNULL
    else:
        root: Path = request.getfixturevalue("cached_rootfs")
        cmd = [shutil.which("chroot") or "chroot", str(root), "/usr/bin/python3", "-"]
        stdin = subprocess.PIPE
    proc = subprocess.Popen(
        cmd,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    if stdin == subprocess.PIPE:
        assert proc.stdin is not None
        proc.stdin.write(APP.read_text())
        proc.stdin.close()
    out = Output()
    assert proc.stdout is not None
    reader = threading.Thread(target=out.pump, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        out.wait_for(r"^sleeptalker listening on ", timeout=20)
        yield Running(proc, out, f"http://127.0.0.1:{port}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        reader.join(5)


async def timed_get(url: str) -> tuple[int, list[tuple[float, str]], float]:
    """GET url; (status, [(seconds since request start, line)], total seconds)."""
    started = time.monotonic()
    lines: list[tuple[float, str]] = []
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        while True:
            raw = await resp.content.readline()
            if not raw:
                break
            lines.append((time.monotonic() - started, raw.decode()))
        return resp.status, lines, time.monotonic() - started


def test_ticks_every_interval(app: Running) -> None:
    first, _, _ = app.out.wait_for(r"^tick ", timeout=5)
    app.out.wait_for(r"^tick ", timeout=5, start=first + 10)
    ticks = [(t, TICK_RE.match(line)) for t, line in app.out.snapshot() if line.startswith("tick ")]
    assert all(m is not None for _, m in ticks), ticks
    counters = [int(m.group(1)) for _, m in ticks if m is not None]
    assert counters[0] == 1
    assert counters == list(range(1, len(counters) + 1)), "counter must count up by one"
    times = [t for t, _ in ticks]
    span = times[-1] - times[0]
    n = len(times) - 1
    # On a fixed schedule the mean interval is TICK; allow slack for a loaded 2-vCPU machine.
    assert TICK * 0.8 <= span / n <= TICK * 1.3, (span, n)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < TICK * 3, gaps


async def test_request_streams_then_sleeps(app: Running) -> None:
    status, lines, total = await timed_get(app.base + "/some/path?sleep=1")
    assert status == 200
    assert [text for _, text in lines] == [FIRST, LAST]
    assert lines[0][0] < 0.5, "first line must arrive before the sleep"
    assert 0.95 <= lines[1][0] < 2.0, "second line comes after the sleep"
    assert total < 2.5
    app.out.wait_for(r"^request GET /some/path\?sleep=1 200 ", timeout=2)


async def test_default_sleep_is_two_seconds(app: Running) -> None:
    status, lines, _ = await timed_get(app.base + "/")
    assert status == 200
    assert [text for _, text in lines] == [FIRST, LAST]
    assert lines[0][0] < 0.5
    assert 1.95 <= lines[1][0] < 3.0


async def test_sleep_zero_is_fast(app: Running) -> None:
    for q in ("?sleep=0", "?sleep=0.05"):
        status, lines, total = await timed_get(app.base + "/" + q)
        assert status == 200
        assert [text for _, text in lines] == [FIRST, LAST]
        assert total < 0.5, (q, total)


@pytest.mark.parametrize("bad", ["abc", "-1", "nan", "inf", "", "1e9", "2s"])
async def test_invalid_sleep_is_400(app: Running, bad: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(app.base + "/", params={"sleep": bad}) as resp:
            body = await resp.text()
    assert resp.status == 400, body
    assert "invalid sleep parameter" in body
    assert repr(bad) in body
    app.out.wait_for(r"^request GET /\?sleep=\S* 400 ", timeout=2)


async def test_sigterm_exits_promptly_with_zero(app: Running) -> None:
    # An in-flight 2-second request must not hold the shutdown up.
    async with aiohttp.ClientSession() as session, session.get(app.base + "/slow") as resp:
        assert (await resp.content.readline()).decode() == FIRST
        rc, took = app.terminate_and_wait(timeout=5)
    assert rc == 0
    assert took < 1.5, took
    app.out.wait_for(r"^sleeptalker stopped$", timeout=2)


def test_sigterm_when_idle(app: Running) -> None:
    app.out.wait_for(r"^tick 2 ", timeout=5)
    rc, took = app.terminate_and_wait(timeout=5)
    assert rc == 0
    assert took < 1.0, took


@pytest.mark.containerd
def test_cached_rootfs_has_bookworm_aiohttp(cached_rootfs: Path) -> None:
    version = subprocess.run(
        [
            shutil.which("chroot") or "chroot",
            str(cached_rootfs),
            "/usr/bin/python3",
            "-c",
            "import aiohttp, sys; print(aiohttp.__version__, sys.version_info[:2])",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert version[0].startswith("3.8."), version  # Debian bookworm's python3-aiohttp
    tar = cached_rootfs.parent / "rootfs.tar"
    assert tar.is_file() and tar.stat().st_size > 10_000_000
    # Slimmed: no docs or man pages shipped.
    assert not any((cached_rootfs / "usr/share/doc").iterdir())
    assert not (cached_rootfs / "usr/share/man").exists() or not any(
        (cached_rootfs / "usr/share/man").iterdir()
    )
