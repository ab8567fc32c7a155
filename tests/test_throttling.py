"""The throttle mode's pure decisions (daemon/throttling.py): limits read from a verbose CRI
status, the floor, and what a daemon without a record restores."""

from __future__ import annotations

import json

import pytest

from daemon.throttling import (
    CpuLimits,
    created_limits,
    current_limits,
    floor_quota,
    is_floor,
    restore_target,
    sidecar_args,
    sidecar_floor,
    throttled,
)


def info(spec_cpu: dict[str, object], config_res: dict[str, object] | None) -> dict[str, str]:
    body: dict[str, object] = {
        "runtimeSpec": {"linux": {"resources": {"cpu": spec_cpu, "memory": {"limit": 268435456}}}}
    }
    if config_res is not None:
        body["config"] = {"linux": {"resources": config_res}, "command": ["/p"], "args": ["-x"]}
    return {"info": json.dumps(body)}


def test_limits_as_containerd_reports_them() -> None:
    got = info({"shares": 512, "quota": 50000, "period": 100000}, {"cpu_quota": 50000})
    assert current_limits(got) == CpuLimits(100000, 50000, 512, 268435456)
    assert created_limits(got) == CpuLimits(100000, 50000)
    unlimited = info({}, {})
    assert current_limits(unlimited).quota == -1 and current_limits(unlimited).unlimited
    assert created_limits(unlimited) == CpuLimits(100000, -1)
    assert created_limits(info({}, None)) is None  # CRI-O: no config
    for bad in ({}, {"info": "not json"}, {"info": "[]"}, {"info": "{}"}):
        with pytest.raises(ValueError):
            current_limits(bad)


@pytest.mark.parametrize(
    ("millis", "period", "quota"),
    [(10, 100000, 1000), (50, 100000, 5000), (10, 50000, 1000), (999, 100000, 99900)],
)
def test_floor_quota_never_below_the_kernels_minimum(millis: int, period: int, quota: int) -> None:
    assert floor_quota(millis, period) == quota


def test_throttled_changes_only_the_quota_and_never_raises_it() -> None:
    own = CpuLimits(100000, 50000, 512, 1 << 28, "0-1", "0")
    assert throttled(own, 10) == CpuLimits(100000, 1000, 512, 1 << 28, "0-1", "0")
    assert throttled(CpuLimits(100000, 500), 10).quota == 500  # below the floor already
    assert throttled(CpuLimits(100000, -1), 20).quota == 2000


def test_restore_target_only_for_a_container_at_our_floor() -> None:
    created = CpuLimits(100000, 50000, 512)
    at_floor = CpuLimits(100000, 1000, 512, 1 << 28)
    assert is_floor(at_floor, 10) and not is_floor(at_floor, 20)
    assert restore_target(at_floor, created, 10) == CpuLimits(100000, 50000, 512, 1 << 28)
    assert restore_target(at_floor, created, 20) is None  # another floor: not ours
    assert restore_target(at_floor, None, 10) is None  # nothing to restore from
    assert restore_target(CpuLimits(100000, -1), created, 10) is None
    assert restore_target(at_floor, CpuLimits(100000, 1000), 10) is None  # created so
    assert restore_target(at_floor, CpuLimits(100000, -1), 10) == CpuLimits(
        100000, -1, 512, 1 << 28
    )


@pytest.mark.parametrize(
    ("args", "floor"),
    [
        (["freeze-proxy", "--mode", "throttle"], 10),
        (["--mode=throttle", "--throttle-cpu=20m"], 20),
        (["--mode", "throttle", "--throttle-cpu", "0.05"], 50),
        (["--mode", "freeze", "--throttle-cpu", "20m"], None),
        (["--mode", "dry-run"], None),
        ([], None),
        (["--mode", "throttle", "--throttle-cpu", "junk"], None),
        (["--mode"], None),
    ],
)
def test_sidecar_floor_from_its_command_line(args: list[str], floor: int | None) -> None:
    assert sidecar_floor(args) == floor


def test_sidecar_args_from_the_creation_config() -> None:
    assert sidecar_args(info({}, {})) == ["/p", "-x"]
    assert sidecar_args(info({}, None)) == []
