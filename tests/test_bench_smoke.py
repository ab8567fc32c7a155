"""Every benchmark row still runs: ``bench.run --quick --only ROW`` exits 0 and writes its rows.

Numbers are not checked (quick runs are too short to mean anything); a row that crashes, hangs
or writes nothing is. Rows on containerd need root and the test bed's containerd + runc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import ROWS
from testbed.containerd import missing_prerequisites
from testbed.docker import data_root_busy

REPO = Path(__file__).resolve().parent.parent
# Rows that run only loopback processes; every other row drives a real containerd.
NO_CONTAINERD = frozenset({"overhead"})
NEEDS_WRK = frozenset({"overhead", "footprint", "churn"})
# Rows whose table rows carry the row's own name as their bench.
OWN_NAME = frozenset(
    {"overhead", "footprint", "wake", "wake_docker", "capacity", "idle_cpu", "throttle"}
)
TIMEOUT = 180.0  # each quick row takes well under a minute; this only catches a hang

pytestmark = pytest.mark.bench


def _skip(reason: str) -> None:
    if os.environ.get("FREEZE_REQUIRE_REAL") == "1":
        pytest.fail(f"FREEZE_REQUIRE_REAL=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _params() -> list[object]:
    return [
        pytest.param(
            name,
            marks=[] if name in NO_CONTAINERD else [pytest.mark.containerd],
            id=name,
        )
        for name in ROWS
    ]


@pytest.mark.parametrize("row", _params())
def test_quick_row(row: str, tmp_path: Path) -> None:
    if row in NEEDS_WRK and shutil.which("wrk") is None:
        _skip("wrk is not installed (apt-get install wrk)")
    if row not in NO_CONTAINERD:
        why = missing_prerequisites()
        if why:
            _skip(f"a real containerd cannot run here: {why}")
    if row == "wake_docker" and data_root_busy():
        # Not a missing prerequisite: this session's dockerd (tests/image_fixtures.py, used by
        # tests that sort after this file) holds the image cache the row's engine would wait for.
        pytest.skip("a private dockerd of this session holds the data root; run this row alone")
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", row, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    data = json.loads(out.read_text())
    # Only this row ran, so every table row is its (a module may name its bench differently).
    assert data["meta"]["rows"] == [row] and data["meta"]["quick"] is True
    assert data["rows"], f"{row}: the run wrote no rows to {out}\n{proc.stdout[-3000:]}"
    mine = [r for r in data["rows"] if r["bench"] == row]
    assert mine or row not in OWN_NAME, f"no {row!r} rows in {out}: {data['rows']}"


def test_the_before_variant_runs_the_old_code() -> None:
    """``--before REF`` must import freeze_proxy from REF's checkout: run from the repo, ``python
    -m`` would put the current code first on sys.path and compare a commit with itself. And it
    must run as the current code does, in the image's interpreter: this machine's own Python
    has uvloop, which the proxy then uses, so "before" would be the uvloop variant."""
    from bench.common import before_env, before_tree, proxy_python

    with before_tree("HEAD") as tree:
        _check_before_tree(tree, proxy_python(root=tree), before_env(tree))
    assert not tree.exists(), f"the before checkout {tree} was left behind"
    worktrees = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert str(tree) not in worktrees, worktrees


def _check_before_tree(tree: Path, python: str, env: dict[str, str]) -> None:
    probe = (
        "import importlib.util, freeze_proxy; "
        "print(freeze_proxy.__file__); print(importlib.util.find_spec('uvloop') is not None)"
    )
    found, has_uvloop = subprocess.run(
        [python, "-c", probe],
        env={**os.environ, **env},
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert Path(found).resolve().is_relative_to(tree.resolve()), found
    assert has_uvloop == "False", "the before variant can load uvloop; the current one cannot"
