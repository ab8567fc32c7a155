"""daemon/_proto's subsets against the upstream protos containerd 2.x is built from.

The daemon talks to containerd 1.6 and 2.x with one set of stubs; this checks, field by field,
that every service, method, message field and enum value in our subsets has the same name,
number and type in the exact ``containerd/api`` and ``k8s.io/cri-api`` versions containerd
v2.x requires (read at run time from the Go module cache that ``scripts/build_k8s.sh
containerd2`` fills). 1.6 is covered by the real tests on Debian's 1.6.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from testbed import gobins
from tests.conftest import _unavailable

OURS = Path(__file__).resolve().parent.parent / "daemon" / "_proto"
MODCACHE = Path("/var/cache/freeze-proxy/go/pkg/mod")

Fields = dict[str, tuple[str, int]]  # field name -> (type, number)


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", text)


def _blocks(text: str, kind: str) -> dict[str, str]:
    """Top-level ``message``/``enum``/``service`` bodies by name (upstream style: the closing
    brace of a top-level block is at column 0)."""
    pattern = rf"^{kind}\s+(\w+)\s*\{{(.*?)^\}}"
    text = re.sub(r"\{\s*\}", "{\n}", _strip_comments(text))  # "message X {}" closes too
    return dict(re.findall(pattern, text, re.MULTILINE | re.DOTALL))


def _short(type_name: str) -> str:
    """One name per wire type: ``containerd.v1.types.Process`` is ``Process``, and ``string``
    is ``bytes`` (cri-api v0.37 made KeyValue.value bytes; the encoding is the same)."""
    if type_name.startswith("map<"):
        return re.sub(r"\s+", "", type_name)
    short = type_name.rsplit(".", 1)[-1]
    return "bytes" if short == "string" else short


def _fields(body: str) -> Fields:
    found = re.findall(
        r"^\s*(?:repeated\s+|optional\s+)?(map<[^>]+>|[\w.]+)\s+(\w+)\s*=\s*(\d+)\s*[;\[]",
        body,
        re.MULTILINE,
    )
    return {name: (_short(t), int(n)) for t, name, n in found}


def _enum_values(body: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^\s*(\w+)\s*=\s*(-?\d+)\s*;", body, re.MULTILINE)}


def _rpcs(body: str) -> dict[str, tuple[str, str]]:
    found = re.findall(
        r"rpc\s+(\w+)\s*\(\s*(?:stream\s+)?([\w.]+)\s*\)\s*returns\s*\(\s*(?:stream\s+)?([\w.]+)",
        body,
    )
    return {name: (_short(req), _short(resp)) for name, req, resp in found}


def _package(text: str) -> str:
    match = re.search(r"^package\s+([\w.]+)\s*;", text, re.MULTILINE)
    assert match, "no package line"
    return match.group(1)


def _required(module: str) -> str:
    """The version of ``module`` that containerd's pinned release requires (its go.mod)."""
    version = gobins.pinned_version("CONTAINERD_VERSION")
    gomod = MODCACHE / f"cache/download/github.com/containerd/containerd/v2/@v/{version}.mod"
    if not gomod.is_file():
        _unavailable(
            f"containerd {version}'s go.mod is not cached ({gomod}); run "
            "scripts/build_k8s.sh containerd2"
        )
    match = re.search(rf"^\s*{re.escape(module)}\s+(v\S+)", gomod.read_text(), re.MULTILINE)
    assert match, f"{gomod} requires no {module}"
    return match.group(1)


def _upstream(module: str, *files: str) -> str:
    root = MODCACHE / f"{module}@{_required(module)}"
    paths = [root / f for f in files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        _unavailable(f"not in the module cache: {missing}; run scripts/build_k8s.sh containerd2")
    return "\n".join(p.read_text() for p in paths)


def _assert_subset(ours: str, theirs: str) -> None:
    package = re.escape(_package(ours))
    assert re.search(rf"^package\s+{package}\s*;", theirs, re.MULTILINE), "another package"
    for kind, read in (("message", _fields), ("enum", _enum_values), ("service", _rpcs)):
        upstream = _blocks(theirs, kind)
        for name, body in _blocks(ours, kind).items():
            assert name in upstream, f"{kind} {name} is not upstream"
            want = read(upstream[name])
            for key, value in read(body).items():
                got = want.get(key)
                assert got == value, f"{kind} {name}.{key}: ours {value}, upstream {got}"


@pytest.fixture(scope="module")
def tasks_upstream() -> str:
    return _upstream(
        "github.com/containerd/containerd/api",
        "services/tasks/v1/tasks.proto",
        "types/task/task.proto",
    )


def test_the_tasks_subset_matches_containerd_2x(tasks_upstream: str) -> None:
    ours = (OURS / "tasks.proto").read_text()
    _assert_subset(ours, tasks_upstream)
    assert set(_rpcs(_blocks(ours, "service")["Tasks"])) == {"Get", "List", "Pause", "Resume"}


def test_the_cri_subset_matches_the_cri_api_containerd_2x_serves() -> None:
    ours = (OURS / "cri.proto").read_text()
    theirs = _upstream("k8s.io/cri-api", "pkg/apis/runtime/v1/api.proto")
    _assert_subset(ours, theirs)
    assert len(_blocks(ours, "message")) > 30  # the parser saw our messages


def test_the_checker_catches_a_wrong_field_number(tasks_upstream: str) -> None:
    ours = (
        (OURS / "tasks.proto")
        .read_text()
        .replace("uint32 exit_status = 9;", "uint32 exit_status = 8;")
    )
    with pytest.raises(AssertionError, match=r"Process\.exit_status"):
        _assert_subset(ours, tasks_upstream)
