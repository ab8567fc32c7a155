"""What the injected sidecar is given: resources, grace, timeouts (pure: no I/O).

One table of settings, each settable cluster-wide in the ConfigMap ``config-freeze-proxy`` (key
``cpu-limit``) and per Service by the annotation ``freeze-proxy.knative.dev/cpu-limit`` on the
revision template (Knative copies it to the pod). An annotation wins over the ConfigMap, which
wins over the built-in defaults below. A value that does not parse, or that would make the pod
invalid (a request above its limit), is refused with a warning naming it, and the value it
would have replaced applies: a bad setting never makes the API server reject a user's pod.

QoS: when every other container of the pod is Guaranteed (cpu and memory limits, requests equal
to them), the sidecar's requests are set to its limits so that the pod stays Guaranteed (a
Burstable pod is evicted earlier and loses exclusive CPUs under the static CPU manager).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from freeze_proxy import contract
from freeze_proxy.durations import parse_duration

ANNOTATION_PREFIX = "freeze-proxy.knative.dev/"

# Kubernetes resource.Quantity: a decimal number and an optional suffix.
_QUANTITY = re.compile(
    r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?$"
)
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity ("100m", "1", "128Mi", "1e3") as a number; ValueError if none."""
    match = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 100m, 1, 128Mi)")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        value = Decimal(number)
    except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
        raise ValueError(f"{text!r} is not a Kubernetes quantity") from None
    if suffix in _BINARY:
        return value * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return value.scaleb(int(suffix[1:]))
    return value.scaleb(_DECIMAL[suffix])


@dataclass(frozen=True)
class SidecarConfig:
    """The settings; ``None`` means "freeze-proxy's own default" (no flag or env is passed)."""

    # Like Knative's queue-proxy (whose path it shares, request for request): a small request
    # and a 1-CPU limit, which the single-threaded proxy cannot exceed anyway, so it is never
    # throttled while namespaces with a limits.cpu ResourceQuota accept the pod.
    cpu_request: str = "10m"
    cpu_limit: str = "1"
    memory_request: str = "32Mi"
    memory_limit: str = "128Mi"
    grace: str | None = None
    resume_timeout: str | None = None
    drain_timeout: str | None = None
    # freeze, throttle or dry-run (freeze_proxy/contract.py MODES); throttle's CPU floor.
    mode: str | None = None
    throttle_cpu: str | None = None


DEFAULTS = SidecarConfig()
# key (ConfigMap key and annotation suffix) -> field
KEYS = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(SidecarConfig)}
_DURATIONS = ("grace", "resume_timeout", "drain_timeout")
_PAIRS = (("cpu", "cpu_request", "cpu_limit"), ("memory", "memory_request", "memory_limit"))


def _check(field: str, raw: str) -> None:
    """Raise ValueError saying why ``raw`` is no value for ``field``."""
    if field in _DURATIONS:
        parse_duration(raw)
        return
    if field == "mode":
        if raw.strip() not in contract.MODES:
            raise ValueError(f"the mode is one of {', '.join(contract.MODES)}")
        return
    if field == "throttle_cpu":
        contract.parse_millicores(raw)
        return
    value = parse_quantity(raw)
    if value < 0:
        raise ValueError(f"{raw!r} is negative")
    if field.endswith("_limit") and value == 0:
        raise ValueError("a limit of 0 would stop the proxy")


def overrides_from_annotations(annotations: Mapping[str, Any]) -> dict[str, Any]:
    """The pod's ``freeze-proxy.knative.dev/<key>`` annotations, by key."""
    return {
        key: annotations[ANNOTATION_PREFIX + key]
        for key in KEYS
        if ANNOTATION_PREFIX + key in annotations
    }


def apply_overrides(
    base: SidecarConfig, values: Mapping[str, Any], describe: str, fallback: str
) -> tuple[SidecarConfig, list[str]]:
    """``base`` with the valid ``values`` (key -> text) applied, and a warning for each refused
    one. ``describe(key)`` names where a value came from (``"annotation …"``, ``"ConfigMap …"``)
    as a format string with ``{key}``; ``fallback`` says what applies instead."""
    changes: dict[str, str] = {}
    warnings: list[str] = []
    for key, raw in values.items():
        field = KEYS.get(key)
        if field is None:
            continue
        where = describe.format(key=key)
        if not isinstance(raw, str):
            warnings.append(f"{where} is not a string; {fallback}")
            continue
        try:
            _check(field, raw)
        except ValueError as err:
            warnings.append(f"{where}={raw!r} refused: {err}; {fallback}")
            continue
        changes[field] = raw.strip()
    config = dataclasses.replace(base, **changes)
    for resource, request_field, limit_field in _PAIRS:
        request, limit = getattr(config, request_field), getattr(config, limit_field)
        if parse_quantity(request) > parse_quantity(limit):
            touched = [f for f in (request_field, limit_field) if f in changes]
            keys = " and ".join(describe.format(key=f.replace("_", "-")) for f in touched)
            warnings.append(
                f"{keys} refused: the {resource} request {request} would exceed the limit "
                f"{limit}, which the API server rejects; {fallback}"
            )
            config = dataclasses.replace(
                config,
                **{
                    request_field: getattr(base, request_field),
                    limit_field: getattr(base, limit_field),
                },
            )
    return config, warnings


def _resources(container: Mapping[str, Any]) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    resources = container.get("resources")
    resources = resources if isinstance(resources, dict) else {}
    requests = resources.get("requests")
    limits = resources.get("limits")
    return (
        requests if isinstance(requests, dict) else {},
        limits if isinstance(limits, dict) else {},
    )


def _equal(a: Any, b: Any) -> bool:
    try:
        return parse_quantity(str(a)) == parse_quantity(str(b))
    except ValueError:
        return False


def is_guaranteed(containers: list[Mapping[str, Any]]) -> bool:
    """Kubernetes' Guaranteed QoS, for these containers: each has cpu and memory limits, and
    its requests (which the API server defaults to the limits) equal them."""
    if not containers:
        return False
    for container in containers:
        requests, limits = _resources(container)
        for resource in ("cpu", "memory"):
            if resource not in limits:
                return False
            if resource in requests and not _equal(requests[resource], limits[resource]):
                return False
    return True


def resources(config: SidecarConfig, guaranteed: bool) -> dict[str, dict[str, str]]:
    """The sidecar's ``resources``: requests raised to the limits in a Guaranteed pod."""
    if guaranteed:
        limits = {"cpu": config.cpu_limit, "memory": config.memory_limit}
        return {"requests": dict(limits), "limits": limits}
    return {
        "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
        "limits": {"cpu": config.cpu_limit, "memory": config.memory_limit},
    }
