"""A real freeze-daemon process for tests: the one way the test files start one on a test
bed's containerd (the backend and the rest of its flags are the caller's)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from testbed.processes import free_port, wait_listening
from testbed.tokens import DEFAULT_ISSUER

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def daemon_process(
    jwks: Path, backend_args: Sequence[str]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m daemon`` on a free loopback port, keys from ``jwks`` (no TokenReview),
    serving once this yields (URL, process); SIGTERM at exit (then KILL), unless the test
    stopped it first."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daemon",
            f"--listen=127.0.0.1:{port}",
            "--no-token-review",
            f"--jwks-file={jwks}",
            f"--issuer={DEFAULT_ISSUER}",
            *backend_args,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(proc, "127.0.0.1", port, "freeze-daemon")
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
