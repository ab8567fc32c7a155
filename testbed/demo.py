"""``make demo``: an app that talks in its sleep stops talking when it has no request.

On a private, real containerd: a sleeptalker pod made the way kubelet makes it, the real
freeze-daemon (authenticating a locally minted, projected-token-shaped JWT for that pod) and the
real freeze-proxy in front of the app. It measures the app idle without freeze-proxy, then with
it, then sends requests, and prints a live timeline and a summary table. It exits non-zero, with
the reason, when the numbers do not prove the point.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import aiohttp

from testbed.containerd import missing_prerequisites
from testbed.pods import Pod
from testbed.stack import stack

CONTAINER = "user-container"


class WatchedPod(Protocol):
    """What the timeline reads of the app's pod: a CRI pod here, a Kubernetes pod on a cluster
    (testbed/cluster_demo.py)."""

    def log_lines(self, container_name: str) -> list[str]: ...

    def cpu_usage_seconds(self, container_name: str) -> float: ...


@dataclass
class Summary:
    idle_seconds: float
    baseline_ticks: int = 0
    baseline_cpu_s: float = 0.0
    frozen_ticks: int = 0
    frozen_cpu_s: float = 0.0
    busy_ticks: int = 0
    wake_ms: list[float] = field(default_factory=list)  # client: request sent → first byte
    resume_ms: list[float] = field(default_factory=list)  # proxy: resume call round trip
    pauses: int = 0
    resumes: int = 0
    failures: list[str] = field(default_factory=list)

    def table(self) -> str:
        s = self
        wake = sorted(s.wake_ms)
        each = ", ".join(f"{w:.1f}" for w in s.wake_ms)
        wake_txt = f"p50 {wake[len(wake) // 2]:.1f}, max {wake[-1]:.1f}  ({each})" if wake else "-"
        resume_txt = ", ".join(f"{r:.1f}" for r in s.resume_ms) or "-"
        rows = [
            ("", "without freeze-proxy", "with freeze-proxy"),
            (
                f"app ticks while idle ({s.idle_seconds:.0f} s)",
                str(s.baseline_ticks),
                str(s.frozen_ticks),
            ),
            (
                "app CPU while idle (cgroup, s)",
                f"{s.baseline_cpu_s:.4f}",
                f"{s.frozen_cpu_s:.4f}",
            ),
            ("ticks while serving requests", "-", str(s.busy_ticks)),
            ("wake latency, time to first byte (ms)", "-", wake_txt),
            ("resume calls incl. at exit, proxy→daemon→containerd (ms)", "-", resume_txt),
            ("pauses / resumes done", "-", f"{s.pauses} / {s.resumes}"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"  {a:<{width}}  {b:<22}{c}" for a, b, c in rows)


def _progress(step: str) -> Callable[[str], None]:
    started = time.monotonic()
    print(f"• {step} ...", flush=True)

    def done(detail: str = "") -> None:
        took = (time.monotonic() - started) * 1000
        print(f"  done in {took:.0f} ms{': ' + detail if detail else ''}", flush=True)

    return done


def _ticks(pod: WatchedPod) -> int:
    return sum(1 for line in pod.log_lines(CONTAINER) if line.startswith("tick"))


def _resume_times(lines: Iterable[str]) -> list[float]:
    """The proxy's "app resumed" timings, from its JSON log lines."""
    out = []
    for line in lines:
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            if entry.get("msg") == "app resumed":
                out.append(float(entry["took_ms"]))
    return out


class Timeline:
    """Prints one line per sample: requests in flight against the app's ticks."""

    def __init__(self, pod: WatchedPod, health_url: str | None, started: float) -> None:
        self.pod, self.health_url, self.started = pod, health_url, started
        self.last_ticks = _ticks(pod)

    async def sample(self, session: aiohttp.ClientSession, label: str) -> None:
        state, in_flight = "awake", 0
        if self.health_url:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(self.health_url) as r:
                    health = await r.json()
                    state, in_flight = health["state"], int(health["in_flight"])
        ticks = _ticks(self.pod)
        new, self.last_ticks = ticks - self.last_ticks, ticks
        t = time.monotonic() - self.started
        bar = "█" * in_flight if in_flight else "·"
        talk = "tick " * new if new else ""
        print(f"  {t:6.1f}s  {label:<8} requests {bar:<3} app {state:<8} {talk}", flush=True)


async def _watch(timeline: Timeline, label: str, seconds: float, every: float = 0.5) -> None:
    async with aiohttp.ClientSession() as session:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(min(every, max(0.0, end - time.monotonic())))
            await timeline.sample(session, label)


async def _request(url: str, sleep: float) -> tuple[float, str]:
    """One request; returns (ms until the first byte, the whole body)."""
    async with aiohttp.ClientSession() as s:
        started = time.perf_counter()
        async with s.get(f"{url}/?sleep={sleep}") as r:
            first = await r.content.readany()
            wake_ms = (time.perf_counter() - started) * 1000
            rest = await r.read()
            if r.status != 200:
                raise RuntimeError(f"request answered {r.status}: {(first + rest)[:200]!r}")
            return wake_ms, (first + rest).decode()


async def run(args: argparse.Namespace) -> Summary:
    if args.cluster:
        from testbed import cluster, cluster_demo  # the cluster's modules load only for it

        why = cluster.missing_prerequisites()
        if why:
            raise SystemExit(f"the cluster demo needs a real node here, but {why}")
        return await cluster_demo.run(args)
    why = missing_prerequisites()
    if why:
        raise SystemExit(f"the demo needs a real containerd here, but {why}")
    work = Path(tempfile.mkdtemp(prefix="freeze-demo-"))
    try:
        return await _run(args, work)
    finally:
        if not (args.keep_logs or args.keep):
            shutil.rmtree(work, ignore_errors=True)


async def _run(args: argparse.Namespace, work: Path) -> Summary:
    summary = Summary(idle_seconds=args.idle)
    done = _progress("starting a private containerd and freeze-daemon (local JWKS, no API server)")
    async with stack(work, keep_work=args.keep_logs) as st:
        done(f"{st.containerd.socket}, daemon at {st.daemon_url}")

        done = _progress("building the sleeptalker image (Debian rootfs with python3 + aiohttp)")
        image = st.sleeptalker_image()
        done(image)

        done = _progress("creating the pod through CRI, the way kubelet does")
        pod, app_port = await st.sleeptalker_pod()
        done(f"pod uid {pod.uid}, cgroup {pod.cgroup_parent}, app on :{app_port}")

        started = time.monotonic()
        print(f"\n• the app idle WITHOUT freeze-proxy for {args.idle:.0f} s", flush=True)
        timeline = Timeline(pod, None, started)
        summary.baseline_cpu_s, summary.baseline_ticks = await _idle(timeline, "idle", args.idle)

        grace = [f"--grace={args.grace}"] if args.grace is not None else []
        done = _progress("starting freeze-proxy in front of the app, with the pod's token")
        async with st.proxy(pod, app_port, *grace) as proxy:
            await pod.wait_frozen(CONTAINER, hint=f"; see {proxy.health_url} and the logs")
            done(f"{proxy.url}: the app is frozen")
            timeline = Timeline(pod, proxy.health_url, started)
            print(f"\n• the app idle WITH freeze-proxy for {args.idle:.0f} s", flush=True)
            summary.frozen_cpu_s, summary.frozen_ticks = await _idle(timeline, "frozen", args.idle)

            print(f"\n• {args.requests} requests, each asking the app to take 1 s", flush=True)
            hint = f"; see {proxy.health_url} and the logs"
            await _requests(
                summary,
                timeline,
                proxy.url,
                args.requests,
                lambda: pod.wait_frozen(CONTAINER, hint=hint),
            )
            health = await proxy.health()
            summary.pauses, summary.resumes = health["pauses"], health["resumes"]
            if args.keep:
                await _keep(proxy.url, pod, work)
        summary.resume_ms = _resume_times(proxy.log_file.read_text(errors="replace").splitlines())
        done = _progress("tearing down (pods, shims, cgroups, mounts)")
    done("nothing left behind")
    return summary


async def _keep(url: str, pod: Pod, work: Path) -> None:
    print(
        "\nLeft running. Try it by hand (Ctrl-C tears everything down):\n"
        f"  curl '{url}/?sleep=2'\n"
        f"  tail -f {pod.log_path(CONTAINER)}      # the app's ticks\n"
        f"  cat {pod.cgroup_dir(CONTAINER)}/freezer.state\n"
        f"  logs: {work}/proxy.log {work}/daemon.log",
        flush=True,
    )
    await until_signalled()


async def until_signalled() -> None:
    """Return on Ctrl-C or SIGTERM (--keep: the caller then tears everything down)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


async def _idle(timeline: Timeline, label: str, seconds: float) -> tuple[float, int]:
    """Watch the idle app for ``seconds``: (its CPU seconds, its ticks) meanwhile."""
    pod = timeline.pod
    cpu0, ticks0 = pod.cpu_usage_seconds(CONTAINER), _ticks(pod)
    await _watch(timeline, label, seconds)
    return pod.cpu_usage_seconds(CONTAINER) - cpu0, _ticks(pod) - ticks0


async def _requests(
    summary: Summary,
    timeline: Timeline,
    url: str,
    count: int,
    wait_frozen: Callable[[], Awaitable[object]],
) -> None:
    """``count`` requests of 1 s each, every one sent to a frozen app; into ``summary``."""
    pod = timeline.pod
    for _ in range(count):
        await wait_frozen()
        ticks0 = _ticks(pod)
        request = asyncio.ensure_future(_request(url, 1.0))
        await _watch(timeline, "request", 1.0, every=0.25)
        wake_ms, body = await request
        summary.busy_ticks += _ticks(pod) - ticks0
        summary.wake_ms.append(wake_ms)
        if "world" not in body:
            summary.failures.append(f"a request got an incomplete answer: {body!r}")
        await _watch(timeline, "idle", 1.0)


def verdict(s: Summary) -> list[str]:
    """Why the run did not prove the point (empty: it did)."""
    problems = list(s.failures)
    if s.baseline_ticks == 0:
        problems.append("the app did not tick even without freeze-proxy: it is not running")
    if s.frozen_ticks:
        problems.append(f"the app ticked {s.frozen_ticks} times while it should have been frozen")
    if s.frozen_cpu_s > 0.005:
        problems.append(f"the frozen app still used {s.frozen_cpu_s:.4f} s of CPU")
    if s.busy_ticks == 0:
        problems.append("the app did not tick while serving requests: it was not woken")
    if s.resumes < len(s.wake_ms):
        problems.append("fewer resumes than requests: some request did not wake the app")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make demo", description=__doc__)
    p.add_argument("--idle", type=float, default=5.0, help="seconds of each idle phase")
    p.add_argument("--requests", type=int, default=3, help="requests to send")
    p.add_argument("--grace", default=None, help="freeze-proxy --grace (default: its default)")
    p.add_argument("--keep", action="store_true", help="leave it running; Ctrl-C tears down")
    p.add_argument(
        "--cluster",
        action="store_true",
        help="on a real single-node Kubernetes with Knative Serving, installed with kubectl "
        "apply -k config/ from images built by our Dockerfiles (several minutes)",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the work dir and its logs")
    p.add_argument("--json", type=Path, help="also write the summary here (for tests)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the demo starts containerd and makes cgroups: run it as root", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(run(args))
    except KeyboardInterrupt:
        print("\ninterrupted; everything was torn down", file=sys.stderr)
        return 130
    print("\nSummary\n" + summary.table())
    problems = verdict(summary)
    if args.json:
        args.json.write_text(json.dumps({**vars(summary), "problems": problems}, indent=2))
    if problems:
        print("\nThe demo did NOT prove its point:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\nFrozen, the app neither ticked nor used CPU; each request woke it first.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
