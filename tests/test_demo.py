"""The demo's scenario, shorter, asserting the numbers it prints (issue: the local demo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.containerd import pod_cgroup_dirs, shim_pids


@pytest.mark.containerd
def test_demo_proves_its_point_and_leaves_nothing_behind(
    tmp_path: Path, containerd: object
) -> None:
    # ``containerd`` is only requested so the run skips/fails like every real-containerd test.
    out = tmp_path / "summary.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "testbed.demo",
            "--idle",
            "2",
            "--requests",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["problems"] == []
    assert summary["baseline_ticks"] >= 2, "the app must tick when not frozen"
    assert summary["frozen_ticks"] == 0
    assert summary["frozen_cpu_s"] < 0.005
    assert summary["busy_ticks"] >= 1, "ticks resume on request"
    assert len(summary["wake_ms"]) == 2
    assert summary["resumes"] >= 2 and summary["pauses"] >= 2
    # The timeline and the table are what a person reads.
    assert "WITH freeze-proxy" in proc.stdout and "Summary" in proc.stdout
    # Nothing left behind: the demo's containerd directory is gone with its shims and cgroups.
    work = [line for line in proc.stdout.splitlines() if "containerd.sock" in line]
    assert work, proc.stdout[:2000]
    sock = work[0].split(": ", 1)[1].strip()
    assert not Path(sock).exists()
    demo_dir = next(p for p in Path(sock).parents if p.name.startswith("freeze-demo-"))
    assert not demo_dir.exists(), f"the demo left {demo_dir} (its logs and a 124 MB image tar)"
    assert shim_pids(sock) == []
    uid = next(
        line.split("pod uid ")[1].split(",")[0]
        for line in proc.stdout.splitlines()
        if "pod uid" in line
    )
    assert [d for d in pod_cgroup_dirs(uid) if d.exists()] == []
