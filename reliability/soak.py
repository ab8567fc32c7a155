"""The soak: a random schedule against one real pod, proxy and daemon, then the invariants.

Everything is real: containerd and runc freeze the pod's cgroup, ``freeze-daemon`` and
``freeze-proxy`` run as their own processes (the proxy in the image's interpreter). Only the
recorder (``reliability.recorder``) sits between the proxy and the daemon, to time the calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import proxy_python
from testbed import oci, rootfs
from testbed.pods import ContainerSpec, Pod
from testbed.processes import free_port
from testbed.stack import Stack, wait_http

from . import procstat
from .invariants import FREEZE, THAW, Arrival, Sent, Violation, check
from .recorder import Recorder
from .schedule import Abort, Activity, Burst, Episode, Stream, Websocket, episodes
from .stats import Drift, Sample, drift

APP = Path(__file__).resolve().parent / "app.py"
IMAGE = "freeze.test/soak-app:1"
CONTAINER = "user-container"
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass
class SoakResult:
    seed: int
    seconds: float
    episodes: int
    sent: list[Sent]
    arrivals: int
    calls: int
    pauses: int
    resumes: int
    health: dict[str, Any]
    violations: list[Violation]
    drift: dict[str, Drift]
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(1 for s in self.sent if s.needs_arrival)

    @property
    def lost(self) -> int:
        return sum(1 for v in self.violations if v.kind == "lost")


def soak_image(st: Stack) -> str:
    """The soak app on the sleeptalker's Debian rootfs (python3 + aiohttp), imported once."""
    tar = oci.build_image_tar(
        rootfs.python_rootfs(),
        IMAGE,
        st.work / "soak-app.tar",
        ["python3", "/app/app.py"],
        files={"/app/app.py": APP},
    )
    oci.import_image(st.containerd.socket, tar)
    return IMAGE


async def soak_pod(st: Stack, name: str) -> tuple[Pod, int]:
    port = free_port()
    spec = ContainerSpec(
        CONTAINER,
        command=["python3", "/app/app.py"],
        image=IMAGE,
        env={"PORT": str(port), "HOST": "127.0.0.1"},
    )
    pod = await st.client.create_pod([spec], name=name, namespace="soak")
    await wait_http(f"http://127.0.0.1:{port}/ready")
    return pod, port


def parse_app_log(lines: list[str]) -> tuple[list[Arrival], list[int]]:
    """The app's ``arrive <id> <ns>`` and ``tick <ns>`` lines (others ignored)."""
    arrivals: list[Arrival] = []
    ticks: list[int] = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "arrive":
            arrivals.append(Arrival(parts[1], int(parts[2])))
        elif len(parts) == 2 and parts[0] == "tick":
            ticks.append(int(parts[1]))
    return arrivals, ticks


class Client:
    """Carries out activities against the proxy; every request's outcome lands in ``sent``."""

    def __init__(self, session: aiohttp.ClientSession, url: str, seed: int) -> None:
        self.session = session
        self.url = url
        self.sent: list[Sent] = []
        self._ids = count()
        self._seed = seed

    def rid(self) -> str:
        return f"s{self._seed}-{next(self._ids)}"

    async def run(self, a: Activity) -> None:
        if isinstance(a, Burst):
            await self.burst(a)
        elif isinstance(a, Stream):
            await self.stream(a)
        elif isinstance(a, Websocket):
            await self.websocket(a)
        else:
            await self.abort(a)

    async def unary(self) -> None:
        rid = self.rid()
        try:
            async with self.session.post(
                f"{self.url}/unary", data=b"x" * 32, headers={"X-Soak-Id": rid}, timeout=TIMEOUT
            ) as r:
                body = (await r.read()).decode(errors="replace")
            if r.status == 200 and body == rid:
                self.sent.append(Sent(rid, "unary", answers=1))
            else:
                err = f"{r.status} {body[:200]}"
                self.sent.append(Sent(rid, "unary", wrong=int(r.status == 200), error=err))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.sent.append(Sent(rid, "unary", error=repr(exc)))

    async def burst(self, b: Burst) -> None:
        sem = asyncio.Semaphore(b.concurrency)

        async def one() -> None:
            async with sem:
                await self.unary()

        await asyncio.gather(*(one() for _ in range(b.requests)))

    async def stream(self, s: Stream) -> None:
        rid = self.rid()
        url = f"{self.url}/stream?chunks={s.chunks}&gap={s.gap_s:.3f}"
        try:
            async with self.session.get(url, headers={"X-Soak-Id": rid}, timeout=TIMEOUT) as r:
                body = (await r.read()).decode(errors="replace")
            want = "".join(f"{rid} {k}\n" for k in range(s.chunks))
            if r.status == 200 and body == want:
                self.sent.append(Sent(rid, "stream", answers=1))
            else:
                self.sent.append(Sent(rid, "stream", error=f"{r.status} {body[:200]!r}"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.sent.append(Sent(rid, "stream", error=repr(exc)))

    async def websocket(self, w: Websocket) -> None:
        rid = self.rid()
        messages: list[Sent] = []
        try:
            async with self.session.ws_connect(f"{self.url}/ws", headers={"X-Soak-Id": rid}) as ws:
                self.sent.append(Sent(rid, "websocket", answers=1))
                for k in range(w.messages):
                    if k:
                        await asyncio.sleep(w.gap_s)
                    mid = f"{rid}-m{k}"
                    await ws.send_str(mid)
                    msg = await ws.receive(timeout=30.0)
                    ok = msg.type == aiohttp.WSMsgType.TEXT and msg.data == mid
                    messages.append(
                        Sent(
                            mid,
                            "ws-message",
                            answers=int(ok),
                            needs_arrival=False,
                            error="" if ok else f"got {msg.type} {str(msg.data)[:100]}",
                        )
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if not any(s.rid == rid for s in self.sent):
                self.sent.append(Sent(rid, "websocket", error=repr(exc)))
            else:
                messages.append(
                    Sent(f"{rid}-m?", "ws-message", needs_arrival=False, error=repr(exc))
                )
        self.sent += messages

    async def abort(self, a: Abort) -> None:
        rid = self.rid()
        if a.mid_response:
            url = f"{self.url}/stream?chunks=20&gap=0.05"
            try:
                async with self.session.get(url, headers={"X-Soak-Id": rid}, timeout=TIMEOUT) as r:
                    await r.content.readline()
                    r.close()  # drops the connection with the response half read
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.sent.append(Sent(rid, "abort-mid-response", aborted=True))
            return
        # Give up within a few ms: usually while the proxy waits for the resume.
        task = asyncio.ensure_future(self.unary_raw(rid))
        await asyncio.sleep(0.001 * (int(rid.rsplit("-", 1)[1]) % 8))  # seeded: from the id
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, TimeoutError):
            await task
        self.sent.append(Sent(rid, "abort-before-answer", aborted=True))

    async def unary_raw(self, rid: str) -> None:
        async with self.session.post(
            f"{self.url}/unary", data=b"y", headers={"X-Soak-Id": rid}, timeout=TIMEOUT
        ) as r:
            await r.read()


async def _settled(session: aiohttp.ClientSession, health_url: str, limit: float = 5.0) -> None:
    """Until the proxy says the app is frozen (its pool is closed across a freeze, so the
    descriptors counted then are the ones it keeps), or ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(health_url) as r:
                if (await r.json()).get("state") == "frozen":
                    return
        await asyncio.sleep(0.02)


async def _sampler(
    pids: dict[str, int],
    every: float,
    out: dict[str, list[Sample]],
    t0: float,
    health_url: str,
) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            await _settled(session, health_url)
            for name, pid in pids.items():
                out.setdefault(name, []).append(procstat.sample(pid, time.monotonic() - t0))
            await asyncio.sleep(every)


async def run_soak(
    st: Stack,
    seconds: float,
    seed: int,
    sample_every: float = 10.0,
    warmup_s: float | None = None,
    progress: Callable[[str], None] = print,
) -> SoakResult:
    """Drive ``seed``'s schedule for ``seconds`` through a real proxy to a real frozen pod."""
    soak_image(st)
    pod, app_port = await soak_pod(st, "soak")
    recorder = Recorder(st.daemon_url)
    await recorder.start()
    samples: dict[str, list[Sample]] = {}
    n_episodes = 0
    try:
        async with st.proxy(
            pod,
            app_port,
            f"--state-file={st.work / 'soak-may-be-frozen'}",
            python=proxy_python(),
            daemon_url=recorder.url,
        ) as proxy:
            assert st.daemon_proc is not None
            pids = {"proxy": proxy.proc.pid, "daemon": st.daemon_proc.pid}
            connector = aiohttp.TCPConnector(limit=64)
            async with aiohttp.ClientSession(connector=connector) as session:
                client = Client(session, proxy.url, seed)
                t0 = time.monotonic()
                sampler = asyncio.ensure_future(
                    _sampler(pids, sample_every, samples, t0, proxy.health_url)
                )
                last_report = t0
                try:
                    schedule = episodes(seed)
                    while time.monotonic() - t0 < seconds:
                        ep: Episode = next(schedule)
                        await asyncio.sleep(ep.idle_s)
                        await asyncio.gather(*(client.run(a) for a in ep.activities))
                        n_episodes += 1
                        if time.monotonic() - last_report >= 60:
                            last_report = time.monotonic()
                            progress(
                                f"  soak: {last_report - t0:.0f} s, {len(client.sent)} sent, "
                                f"{len(recorder.calls)} daemon calls"
                            )
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                async with aiohttp.ClientSession() as probe:
                    await _settled(probe, proxy.health_url)
                for name, pid in pids.items():  # the last sample, settled after the schedule
                    samples[name].append(procstat.sample(pid, time.monotonic() - t0))
                elapsed = time.monotonic() - t0
            health = await proxy.health()
        # The proxy has stopped (its exit resumes the app, recorded); the app's last lines are
        # in its log once it ticked after that.
        await asyncio.sleep(0.3)
        arrivals, ticks = parse_app_log(pod.log_lines(CONTAINER))
    finally:
        await recorder.stop()
        await pod.remove()
    calls = recorder.calls
    violations = check(arrivals, ticks, calls, client.sent)
    pauses = sum(1 for c in calls if c.op == FREEZE and c.status == 200)
    resumes = sum(1 for c in calls if c.op == THAW and c.status == 200)
    if int(health.get("pauses", -1)) != pauses:
        violations.append(
            Violation("counters", f"proxy counts {health.get('pauses')} pauses, recorder {pauses}")
        )
    warm = warmup_s if warmup_s is not None else min(60.0, seconds / 5)
    return SoakResult(
        seed=seed,
        seconds=elapsed,
        episodes=n_episodes,
        sent=client.sent,
        arrivals=len(arrivals),
        calls=len(calls),
        pauses=pauses,
        resumes=resumes,
        health=health,
        violations=violations,
        drift={name: drift(s, warm) for name, s in samples.items()},
        samples=samples,
    )
