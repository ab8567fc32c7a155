"""The sidecar's settings (webhook/sidecar.py): quantities, overrides, QoS."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from webhook.sidecar import (
    DEFAULTS,
    KEYS,
    SidecarConfig,
    apply_overrides,
    is_guaranteed,
    overrides_from_annotations,
    parse_quantity,
    resources,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", "1"),
        ("100m", "0.1"),
        ("1000m", "1"),
        ("0.5", "0.5"),
        (".5", "0.5"),
        ("128Mi", str(128 * 2**20)),
        ("1Gi", str(2**30)),
        ("1k", "1000"),
        ("1M", "1000000"),
        ("1e3", "1000"),
        ("2E-3", "0.002"),
        ("5n", "0.000000005"),
        ("0", "0"),
        ("-1", "-1"),
    ],
)
def test_parse_quantity(text: str, value: str) -> None:
    assert parse_quantity(text) == Decimal(value)


@pytest.mark.parametrize("text", ["", "lots", "1 Gi", "1GB", "Mi", "1.2.3", "0x10", "1mi"])
def test_parse_quantity_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity(text)


def test_keys_are_the_documented_ones() -> None:
    assert set(KEYS) == {
        "cpu-request",
        "cpu-limit",
        "memory-request",
        "memory-limit",
        "grace",
        "resume-timeout",
        "drain-timeout",
        "mode",
        "throttle-cpu",
    }


def test_mode_and_throttle_cpu_are_checked_and_junk_is_refused_with_a_warning() -> None:
    config, warnings = apply_overrides(
        DEFAULTS, {"mode": "throttle", "throttle-cpu": "50m"}, "annotation {key}", "default"
    )
    assert (config.mode, config.throttle_cpu, warnings) == ("throttle", "50m", [])
    config, warnings = apply_overrides(
        DEFAULTS, {"mode": "nap", "throttle-cpu": "1m"}, "annotation {key}", "default used"
    )
    assert (config.mode, config.throttle_cpu) == (None, None)
    assert len(warnings) == 2 and all("default used" in w for w in warnings)
    assert "freeze, throttle, dry-run" in warnings[0] and "10m to 999m" in warnings[1]


def test_defaults_are_valid_and_have_a_cpu_limit() -> None:
    config, warnings = apply_overrides(DEFAULTS, {}, "{key}", "")
    assert config == DEFAULTS and not warnings
    assert resources(DEFAULTS, guaranteed=False)["limits"] == {"cpu": "1", "memory": "128Mi"}


def test_configmap_then_annotation_precedence() -> None:
    cluster, warnings = apply_overrides(
        DEFAULTS,
        {"cpu-limit": "2", "grace": "1s", "_example": "ignored", "unknown": "x"},
        "ConfigMap key {key}",
        "the built-in default is used instead",
    )
    assert not warnings
    assert (cluster.cpu_limit, cluster.grace) == ("2", "1s")
    pod, warnings = apply_overrides(cluster, {"grace": "5s"}, "annotation {key}", "")
    assert not warnings
    assert (pod.cpu_limit, pod.grace) == ("2", "5s")


def test_refused_values_name_their_source_and_keep_the_base() -> None:
    base = SidecarConfig(cpu_limit="2", grace="1s")
    config, warnings = apply_overrides(
        base,
        {"cpu-limit": "0", "grace": "soon", "drain-timeout": "30s", "memory-request": 64},
        "annotation a/{key}",
        "the cluster default is used instead",
    )
    assert config == SidecarConfig(cpu_limit="2", grace="1s", drain_timeout="30s")
    assert len(warnings) == 3
    assert all("the cluster default is used instead" in w for w in warnings)
    assert any("annotation a/cpu-limit='0' refused" in w for w in warnings)
    assert any("annotation a/grace='soon' refused: invalid duration" in w for w in warnings)
    assert any("annotation a/memory-request is not a string" in w for w in warnings)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"cpu-request": "2"}, ["cpu-request"]),  # above the default 1 CPU limit
        ({"cpu-limit": "5m"}, ["cpu-limit"]),  # below the default 10m request
        ({"memory-request": "1Gi", "memory-limit": "512Mi"}, ["memory-request", "memory-limit"]),
    ],
)
def test_request_above_limit_is_refused_as_a_pair(values: dict[str, str], named: list[str]) -> None:
    config, (warning,) = apply_overrides(DEFAULTS, values, "k/{key}", "defaults apply")
    assert config == DEFAULTS
    for key in named:
        assert f"k/{key}" in warning
    assert "would exceed the limit" in warning and "defaults apply" in warning


def test_raising_both_together_is_fine() -> None:
    config, warnings = apply_overrides(
        DEFAULTS, {"cpu-request": "2", "cpu-limit": "2"}, "{key}", ""
    )
    assert not warnings and (config.cpu_request, config.cpu_limit) == ("2", "2")


def _c(requests: dict[str, str] | None, limits: dict[str, str] | None) -> dict[str, Any]:
    res: dict[str, Any] = {}
    if requests is not None:
        res["requests"] = requests
    if limits is not None:
        res["limits"] = limits
    return {"name": "c", "resources": res}


@pytest.mark.parametrize(
    ("containers", "expected"),
    [
        ([], False),
        ([_c(None, None)], False),
        ([_c({"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"})], True),
        ([_c({"cpu": "1000m", "memory": "1024Mi"}, {"cpu": "1", "memory": "1Gi"})], True),
        ([_c(None, {"cpu": "1", "memory": "1Gi"})], True),  # requests default to limits
        ([_c({"cpu": "500m", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"})], False),
        ([_c({"cpu": "1"}, {"cpu": "1"})], False),  # no memory limit
        (
            [
                _c({"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"}),
                _c({"cpu": "25m"}, None),
            ],
            False,
        ),
        ([{"name": "c"}], False),
        ([{"name": "c", "resources": {"limits": "bogus"}}], False),
    ],
)
def test_is_guaranteed(containers: list[dict[str, Any]], expected: bool) -> None:
    assert is_guaranteed(containers) is expected


def test_guaranteed_resources_are_the_limits() -> None:
    config = SidecarConfig(cpu_limit="250m", memory_limit="64Mi")
    assert resources(config, guaranteed=True) == {
        "requests": {"cpu": "250m", "memory": "64Mi"},
        "limits": {"cpu": "250m", "memory": "64Mi"},
    }


def test_overrides_from_annotations_takes_only_known_keys() -> None:
    annotations = {
        "freeze-proxy.knative.dev/cpu-limit": "2",
        "freeze-proxy.knative.dev/enabled": "true",
        "freeze-proxy.knative.dev/container": "x",
        "other.example/cpu-limit": "9",
    }
    assert overrides_from_annotations(annotations) == {"cpu-limit": "2"}
