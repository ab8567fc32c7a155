"""``make reliability`` in small: a 20 s soak, 50 connections and 4 pods on real containerd.

Proves the drivers and the checker work end to end (the figures come from the long run): the
run exits 0, every request was answered, no invariant was violated, pauses happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.containerd import missing_prerequisites

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.containerd


def test_short_soak_and_load(tmp_path: Path) -> None:
    why = missing_prerequisites()
    if why:
        if os.environ.get("FREEZE_REQUIRE_REAL") == "1":
            pytest.fail(f"FREEZE_REQUIRE_REAL=1 but a real containerd cannot run here: {why}")
        pytest.skip(f"a real containerd cannot run here: {why}")
    out = tmp_path / "reliability.json"
    args = [
        "--minutes=0.34",
        "--sample-every=2",
        "--connections=50",
        "--requests-each=3",
        "--pods=4",
        "--pod-seconds=3",
        "--no-tests",
        "--seed=15",
        f"--out={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "reliability.run", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r["values"] for r in json.loads(out.read_text())["rows"]}
    soak = next(v for k, v in rows.items() if k.startswith("soak ") and "seed 15" in k)
    assert soak["violations"] == 0 and soak["lost"] == 0 and soak["requests"] > 50
    freezes = rows["soak: freezes (recorded at the daemon)"]
    assert freezes["pauses"] >= 3 and abs(freezes["pauses"] - freezes["resumes"]) <= 1
    conns = rows["50 keep-alive conns, one proxy"]
    assert conns["ok"] == 150 and conns["errors"] == 0
    pods = rows["4 pods, one daemon, 2 clients"]
    assert pods["errors"] == 0 and pods["state_mismatches"] == 0 and pods["wakes"] > 0
