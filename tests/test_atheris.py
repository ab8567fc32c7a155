"""Coverage-guided fuzzing with atheris (tests/atheris_fuzz.py), run as libFuzzer runs it: in a
process of its own, which exits non-zero with the failing input written as a file.

The budget scales with ``FREEZE_FUZZ_EXAMPLES`` like the hypothesis tests' (``make reliability``
sets it), up to ``MAX_SECONDS`` per target; the seed is fixed (``FREEZE_FUZZ_SEED``, default 1)
so that ``make test`` replays the same inputs and a failure reproduces.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability_report import write_figure
from tests.test_fuzz_webhook import PRISTINE
from tests.test_http1_differential import ATHERIS_FOUND, FOUND, VALID

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parent.parent

# A budget scaled for hypothesis (make reliability: 2000x) would run for hours here: libFuzzer
# stops after this long at the latest (the figure says how many runs that was).
MAX_SECONDS = 300

# target: (seed inputs, runs at FREEZE_FUZZ_EXAMPLES=1, longest input)
TARGETS = {
    "http1": ([*FOUND, *VALID, *ATHERIS_FOUND], 50_000, 4096),
    "webhook": ([PRISTINE[0]], 3_000, 65536),
}


@pytest.mark.parametrize("target", list(TARGETS))
def test_atheris_finds_no_failing_input(target: str, tmp_path: Path) -> None:
    seeds, runs, max_len = TARGETS[target]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed_input in seeds:
        (corpus / hashlib.sha1(seed_input).hexdigest()).write_bytes(seed_input)
    scale = float(os.environ.get("FREEZE_FUZZ_EXAMPLES", "1") or 1)
    runs = max(1, int(runs * scale))
    seed = os.environ.get("FREEZE_FUZZ_SEED", "1")
    proc = subprocess.run(
        [
            sys.executable, "-m", "tests.atheris_fuzz", target,
            f"-runs={runs}", f"-max_total_time={MAX_SECONDS}", f"-seed={seed}",
            f"-max_len={max_len}", "-timeout=10",
            f"-artifact_prefix={tmp_path}/", str(corpus),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    failing = sorted(
        p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-"))
    )
    report = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING"))
    if proc.returncode != 0 or failing:
        write_figure(f"fuzz-atheris-{target}", fuzz=f"atheris_{target}", cases=0, failures=1)
        inputs = {name: (tmp_path / name).read_bytes()[:2000] for name in failing}
        pytest.fail(f"atheris ({target}, seed {seed}) failed: {inputs}\n{report[-4000:]}")
    done = re.search(r"^#(\d+)\s+DONE\s+cov: (\d+)", proc.stderr, re.MULTILINE)
    assert done, report[-2000:]
    write_figure(
        f"fuzz-atheris-{target}",
        fuzz=f"atheris_{target}",
        cases=int(done[1]),
        failures=0,
        coverage=int(done[2]),
        seed=seed,
    )
