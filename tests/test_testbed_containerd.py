"""The test bed's containerd: pure parts (config text per flavor, who holds the shared dirs)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from testbed.containerd import MAX_SOCKET_DIR, _config, holds_shared_dirs

SHIM = "/cache/bin/containerd2-shim-runc-v2-v2.4.2"


@pytest.mark.parametrize(
    ("stat", "holds"),
    [
        ("812 (containerd) S 1 812 812 0 -1", True),
        ("812 (containerd2-v2.) S 1 812 812 0 -1", True),  # the cached 2.x binary, cut to 15
        ("812 (kubelet) S 1 812 812 0 -1", True),
        ("812 (containerd) R 1 812", True),
        # Seen on 2.x: the shim lingers as a zombie after its exit; it holds nothing.
        ("812 (containerd2-shi) Z 1 812 812 0 -1", False),
        ("812 (containerd2-shi) S 1 812 812 0 -1", False),
        ("812 (containerd-shim) S 1 812 812 0 -1", False),
        ("812 (containerd) Z 1 812", False),
        ("812 (containerd) X 1 812", False),
        ("812 (dockerd) S 1 812", False),
        ("812 (a) (containerd) S 1", False),  # comm "a) (containerd": not a containerd
        ("812 (containerd) S", True),
        ("garbage", False),
        ("", False),
    ],
)
def test_who_holds_the_shared_dirs(stat: str, holds: bool) -> None:
    assert holds_shared_dirs(stat) is holds


def _parsed(base: Path, flavor: Any, shim: str | None = None) -> dict[str, Any]:
    return tomllib.loads(_config(base, "busybox:test", flavor, shim))


def test_the_16_config_is_version_2_with_the_shim_from_path() -> None:
    cfg = _parsed(Path("/t/c"), "1.6")
    assert cfg["version"] == 2 and cfg["grpc"]["address"] == "/t/c/containerd.sock"
    cri = cfg["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["sandbox_image"] == "busybox:test" and cri["restrict_oom_score_adj"] is True
    runc = cri["containerd"]["runtimes"]["runc"]
    assert "runtime_path" not in runc and runc["options"]["Root"] == "/t/c/runc-root"


def test_the_2x_config_is_version_3_with_our_shim_and_everything_under_base() -> None:
    cfg = _parsed(Path("/t/c"), "2.x", SHIM)
    assert cfg["version"] == 3
    assert (cfg["root"], cfg["state"]) == ("/t/c/root", "/t/c/state")
    assert cfg["ttrpc"]["address"] == "/t/c/containerd-ttrpc.sock"
    plugins = cfg["plugins"]
    images = plugins["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == "busybox:test"
    rt = plugins["io.containerd.cri.v1.runtime"]
    assert rt["restrict_oom_score_adj"] is True and rt["disable_apparmor"] is True
    runc = rt["containerd"]["runtimes"]["runc"]
    assert runc["runtime_path"] == SHIM and runc["runtime_type"] == "io.containerd.runc.v2"
    assert runc["options"] == {"SystemdCgroup": False, "Root": "/t/c/runc-root"}
    assert rt["cni"]["conf_dir"] == "/t/c/cni/net.d"
    assert plugins["io.containerd.nri.v1.nri"]["disable"] is True
    assert plugins["io.containerd.shim.v1.manager"]["socket_dir"] == "/t/c/s"
    assert "io.containerd.grpc.v1.cri" in plugins  # the streaming server's settings only
    assert "sandbox_image" not in plugins["io.containerd.grpc.v1.cri"]


def test_a_long_base_leaves_the_shim_sockets_at_the_default() -> None:
    base = Path("/" + "d" * (MAX_SOCKET_DIR - 2))  # base + "/s" is one character too long
    plugins = _parsed(base, "2.x", SHIM)["plugins"]
    assert "io.containerd.shim.v1.manager" not in plugins
    short = Path("/" + "d" * (MAX_SOCKET_DIR - 3))
    assert "io.containerd.shim.v1.manager" in _parsed(short, "2.x", SHIM)["plugins"]


def test_the_2x_config_needs_its_shim() -> None:
    with pytest.raises(ValueError, match="shim"):
        _config(Path("/t/c"), "busybox:test", "2.x", None)
