"""A process's resident memory and open descriptors, from /proc (the I/O beside ``stats``)."""

from __future__ import annotations

import os
from pathlib import Path

from .stats import Sample


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS: is {pid} a zombie?")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int, t_s: float) -> Sample:
    return Sample(t_s, rss_kib(pid), fd_count(pid))
