"""Shared pieces of the benchmarks: processes on loopback, wrk, and the result table."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from testbed.processes import free_port, stop, wait_listening

REPO = Path(__file__).resolve().parent.parent
OUT_DIR = REPO / "bench" / "out"
GO_CACHE = Path(os.environ.get("FREEZE_CACHE_DIR", "/var/cache/freeze-proxy"))


@dataclass
class Row:
    """One line of the result table: a benchmark, the variant measured, and its numbers."""

    bench: str
    variant: str
    values: dict[str, float | int | str]
    note: str = ""


@dataclass
class Table:
    rows: list[Row] = field(default_factory=list)

    def add(self, bench: str, variant: str, note: str = "", **values: float | int | str) -> Row:
        return self.add_row(bench, variant, values, note)

    def add_row(
        self, bench: str, variant: str, values: Mapping[str, float | int | str], note: str = ""
    ) -> Row:
        row = Row(bench, variant, dict(values), note)
        self.rows.append(row)
        print(f"  {bench:<10} {variant:<38} {_fmt_values(row.values)}", flush=True)
        return row

    def render(self) -> str:
        lines = [f"{'bench':<10} {'variant':<38} values", "-" * 100]
        for r in self.rows:
            lines.append(f"{r.bench:<10} {r.variant:<38} {_fmt_values(r.values)}")
            if r.note:
                lines.append(f"{'':<10} {'':<38} ({r.note})")
        return "\n".join(lines)

    def write_json(self, path: Path, meta: dict[str, object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"meta": meta, "rows": [vars(r) for r in self.rows]}
        path.write_text(json.dumps(data, indent=2) + "\n")


def _fmt(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _fmt_values(values: dict[str, float | int | str]) -> str:
    return "  ".join(f"{k}={_fmt(v)}" for k, v in values.items())


@contextmanager
def process(
    cmd: Sequence[str],
    port: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a helper process for the duration of a block; wait for its port if given."""
    proc = subprocess.Popen(
        list(cmd),
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if port is not None:
            wait_listening(proc, "127.0.0.1", port, cmd[0], within=15.0)
        yield proc
    finally:
        stop(proc)


@contextmanager
def before_tree(ref: str) -> Iterator[Path]:
    """A checkout of ``ref`` (a git worktree under /tmp) to run the code as it was; removed, with
    its worktree entry, at exit.

    Run its programs with ``cwd`` and ``PYTHONPATH`` both set to it (``before_env``): ``python
    -m`` puts the working directory first on ``sys.path``, so from the repo it would run the
    current code under the old code's name.
    """
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", ref],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"freeze-proxy-before-{sha}-"))
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), sha],
        check=True,
        capture_output=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(tree, ignore_errors=True)


def before_env(tree: Path) -> dict[str, str]:
    return {"PYTHONPATH": str(tree)}


def bench_app(port: int) -> list[str]:
    """The app behind every proxy in the overhead rows (uvloop when installed)."""
    return [sys.executable, "-m", "bench.app", "--port", str(port)]


def proxy_python(fast: bool = False, root: Path = REPO) -> str:
    """An interpreter that sees what the proxy image's clean venv has: the code at ``root`` (the
    repo, or a ``before_tree``) only, or (with ``fast``) also uvloop, as ``pip install
    freeze-proxy[fast]`` would.

    This machine's own site-packages runs .pth start-up hooks (a CA injector importing certifi,
    setuptools' distutils shim) in every Python process, memory a pod never pays; a venv without
    system site-packages runs none of them.
    """
    name = "bench-venv-fast" if fast else "bench-venv"
    venv = GO_CACHE / (name if root == REPO else f"{name}-before")
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    paths = [str(root)]
    if fast:
        import uvloop

        paths.append(str(Path(uvloop.__file__).parent.parent))
    # Plain path lines: the .pth files inside those paths are not run (only a site dir's are).
    pth = venv / "lib" / version / "site-packages" / "freeze-proxy-bench.pth"
    pth.write_text("\n".join(paths) + "\n")
    return str(python)


def freeze_proxy_cmd(
    port: int, upstream_port: int, *extra: str, python: str = sys.executable
) -> list[str]:
    return [
        python,
        "-m",
        "freeze_proxy",
        f"--listen=127.0.0.1:{port}",
        f"--health-listen=127.0.0.1:{free_port()}",
        f"--upstream=http://127.0.0.1:{upstream_port}",
        "--log-level=warning",
        *extra,
    ]


def go_proxy_binary() -> Path:
    """Build the stdlib-only Go baseline proxy once (cached outside the repo)."""
    out = GO_CACHE / "bin" / "bench-goproxy"
    src = REPO / "bench" / "goproxy" / "main.go"
    if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    go = shutil.which("go") or "/usr/local/go/bin/go"
    subprocess.run(
        [go, "build", "-o", str(out), "."],
        cwd=src.parent,
        check=True,
        env={**os.environ, "GOPROXY": "off", "GOFLAGS": "-mod=mod"},
    )
    return out


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float


_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT[m.group(2)]


def wrk(url: str, connections: int, seconds: float, threads: int = 1) -> WrkResult:
    """Run wrk with keep-alive; parse requests/s and the p50/p99 latency from --latency."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    return WrkResult(rps, p50, p99)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine() -> dict[str, object]:
    """Where the numbers came from: they only compare within one run on one machine."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "kernel": os.uname().release,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
