"""No extra may allow a dependency version with a published security fix above its floor.

The table lists the advisories we know of for what the daemon and the webhook parse from the
network (tokens, HTTP, certificates); raise a floor here and in pyproject.toml together.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXTRAS: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
    "optional-dependencies"
]

# (distribution, first fixed version, advisory)
FIXED_IN = [
    (
        "pyjwt",
        (2, 12, 0),
        "CVE-2024-53861 (issuer check, 2.10.1); CVE-2026-32597 (crit header, 2.12.0)",
    ),
    (
        "aiohttp",
        (3, 14, 1),
        "CVE-2025-53643 (smuggling, 3.12.14); CVE-2025-69223..69230 "
        "(3.13.3); CVE-2026-22815, CVE-2026-345xx (3.13.4); the 3.14.0/3.14.1 batch",
    ),
    ("cryptography", (46, 0, 5), "CVE-2024-12797 (44.0.1); CVE-2026-26007 (EC subgroups, 46.0.5)"),
]
_REQUIREMENT = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([0-9.]+)")


def _floors() -> list[tuple[str, str, tuple[int, ...]]]:
    found = []
    for extra, requirements in EXTRAS.items():
        for requirement in requirements:
            match = _REQUIREMENT.match(requirement)
            if match:
                version = tuple(int(p) for p in match.group(3).split("."))
                version += (0,) * (3 - len(version))  # 2.12 == 2.12.0
                found.append((extra, match.group(1).lower(), version))
    return found


@pytest.mark.parametrize(("name", "fixed", "advisory"), FIXED_IN)
def test_every_floor_is_past_known_advisories(
    name: str, fixed: tuple[int, ...], advisory: str
) -> None:
    floors = [(extra, version) for extra, dist, version in _floors() if dist == name]
    assert floors, f"{name} is not required with a >= floor in any extra"
    for extra, version in floors:
        assert version >= fixed, (
            f"extra [{extra}] allows {name} {'.'.join(map(str, version))}, "
            f"below {'.'.join(map(str, fixed))}: {advisory}"
        )
