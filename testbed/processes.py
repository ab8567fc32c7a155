"""Our programs run as processes by tests and benchmarks: wait until they listen, stop them."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_listening(
    proc: subprocess.Popen[Any],
    host: str,
    port: int,
    what: str,
    log_file: Path | None = None,
    within: float = 20.0,
) -> None:
    """Return once ``host:port`` accepts connections. Raise RuntimeError, with the end of the
    program's log (``log_file``, else its stderr pipe), when it exits first or nothing listens
    within ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}{_log_tail(proc, log_file)}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} did not listen on {host}:{port} within {within:g} s"
                    f"{_log_tail(proc, log_file)}"
                ) from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[Any], within: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``within`` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(within)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _log_tail(proc: subprocess.Popen[Any], log_file: Path | None) -> str:
    if log_file is not None and log_file.exists():
        text = log_file.read_text(errors="replace")
    elif proc.stderr is not None and proc.poll() is not None:
        raw = proc.stderr.read()
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    else:
        return ""
    return ":\n" + text[-3000:] if text else ""
