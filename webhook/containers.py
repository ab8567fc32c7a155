"""Which containers of a Knative pod freeze-proxy freezes: pure, from the pod spec alone.

Knative's revision reconciler (pkg/reconciler/revision/resources/deploy.go) makes the container
that declares a port the serving one and every other user container a sidecar; queue-proxy is
added beside them. Freezing is meant for the app: the serving container and the user's other
sidecars (a log shipper, a cache). Never for what carries requests to the app, because a pod
whose request path is frozen cannot be woken — nothing reaches freeze-proxy any more:

* queue-proxy and freeze-proxy themselves;
* mesh proxies that intercept the pod's traffic (``istio-proxy``, ``linkerd-proxy``,
  ``freeze_proxy.contract.MESH_PROXIES``). container-freezer's default, "every container but
  queue-proxy", freezes ``istio-proxy`` in an Istio mesh, and the pod never wakes again;
* native sidecars (``initContainers`` with ``restartPolicy: Always``, how Istio injects
  ``istio-proxy`` with native sidecars on): they start before the app and serve it;
* anything named in the annotation ``freeze-proxy.knative.dev/keep-awake`` (comma-separated).

``freeze-proxy.knative.dev/containers`` (comma-separated) replaces the default list. A list the
webhook cannot honour (an unknown name, a container of the request path, no serving container)
is an error: the webhook then leaves the pod unchanged with a warning saying why, like any pod
it cannot safely change — dropping names silently would freeze what the user did not ask for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from freeze_proxy import contract
from webhook.sidecar import ANNOTATION_PREFIX

ANNOTATION_CONTAINERS = ANNOTATION_PREFIX + "containers"
ANNOTATION_KEEP_AWAKE = ANNOTATION_PREFIX + "keep-awake"


class BadContainerList(ValueError):
    """An annotation names containers the webhook cannot freeze as asked."""


@dataclass(frozen=True)
class FreezeList:
    """The containers to freeze, in pod order, and what the user should be told."""

    containers: list[str]
    warnings: list[str] = field(default_factory=list)


def split_names(raw: object) -> list[str]:
    """``"a, b,,a"`` -> ``["a", "b"]``: trimmed, empty parts dropped, first occurrence kept."""
    if not isinstance(raw, str):
        return []
    return list(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))


def native_sidecars(spec: Mapping[str, Any]) -> list[str]:
    """initContainers with ``restartPolicy: Always``: they keep running beside the app."""
    return [
        str(c.get("name"))
        for c in spec.get("initContainers") or []
        if isinstance(c, dict) and c.get("restartPolicy") == "Always"
    ]


def _infrastructure(name: str, queue_proxy: str, keep_awake: Sequence[str]) -> str | None:
    """Why ``name`` is in the request path (never frozen), or None."""
    if name in (queue_proxy, contract.QUEUE_PROXY_NAME):
        return "it is queue-proxy, which carries every request to the app"
    if name == contract.SIDECAR_NAME:
        return "it is freeze-proxy itself"
    if name in contract.MESH_PROXIES:
        return "it is a service-mesh proxy in the pod's request path"
    if name in keep_awake:
        return f"it is named in {ANNOTATION_KEEP_AWAKE}"
    return None


def freeze_list(
    pod: Mapping[str, Any],
    serving: str,
    queue_proxy: str,
    exec_probes: Callable[[Mapping[str, Any]], list[str]] = lambda _: [],
) -> FreezeList:
    """The containers to freeze: the annotation's list, else the serving container and every
    other regular container that is not request-path infrastructure (module doc).

    ``serving`` is the serving container's name, ``queue_proxy`` queue-proxy's;
    ``exec_probes(container)`` names a container's exec probes: kubelet would exec into a frozen
    container and fail them, so a sidecar with one stays awake by default (with a warning) and
    is refused in an explicit list. Raises BadContainerList naming the cause and the fix.
    """
    spec: Mapping[str, Any] = pod.get("spec") or {}
    annotations: Mapping[str, Any] = (pod.get("metadata") or {}).get("annotations") or {}
    regular = {str(c.get("name")): c for c in spec.get("containers") or [] if isinstance(c, dict)}
    natives = native_sidecars(spec)
    inits = [
        str(c.get("name"))
        for c in spec.get("initContainers") or []
        if isinstance(c, dict) and str(c.get("name")) not in natives
    ]
    keep_awake = split_names(annotations.get(ANNOTATION_KEEP_AWAKE))
    warnings: list[str] = []
    if serving in keep_awake:
        raise BadContainerList(
            f"{ANNOTATION_KEEP_AWAKE} names the serving container {serving!r}: to keep the app "
            f'from being frozen at all, set {ANNOTATION_PREFIX}enabled: "false" instead'
        )
    unknown = [n for n in keep_awake if n not in regular and n not in natives]
    if unknown:
        warnings.append(
            f"{ANNOTATION_KEEP_AWAKE} names no container {', '.join(map(repr, unknown))} "
            f"(containers: {', '.join(regular)}); ignored"
        )

    if ANNOTATION_CONTAINERS in annotations:
        named = split_names(annotations.get(ANNOTATION_CONTAINERS))
        where = f"{ANNOTATION_CONTAINERS}={annotations.get(ANNOTATION_CONTAINERS)!r}"
        if not named:
            raise BadContainerList(
                f"{where} names no container: list the containers to freeze, comma-separated, "
                f"or remove the annotation to freeze {serving!r} and its sidecars"
            )
        for name in named:
            why = _infrastructure(name, queue_proxy, keep_awake)
            if name in natives:
                why = "it is a native sidecar (an initContainer with restartPolicy Always)"
            elif name in inits:
                why = "it is an init container, which has finished before the app starts"
            elif name not in regular:
                raise BadContainerList(
                    f"{where}: the pod has no container {name!r} (containers: {', '.join(regular)})"
                )
            if why is not None:
                raise BadContainerList(
                    f"{where}: {name!r} is never frozen: {why}; freezing it would leave the "
                    "pod unwakeable. Remove it from the list"
                )
            execs = exec_probes(regular[name])
            if execs:
                raise BadContainerList(
                    f"{where}: container {name!r} has {', '.join(f'exec {f}' for f in execs)}, "
                    "which kubelet would run inside the frozen container and fail; remove it "
                    "from the list (it then stays awake) or use an httpGet/tcpSocket probe"
                )
        if serving not in named:
            raise BadContainerList(
                f"{where} leaves out the serving container {serving!r}: freeze-proxy freezes "
                f"the app while it is idle; add {serving!r} to the list"
            )
        return FreezeList([n for n in regular if n in named], warnings)

    chosen: list[str] = []
    for name, container in regular.items():
        if name != serving and _infrastructure(name, queue_proxy, keep_awake) is not None:
            continue
        execs = exec_probes(container) if name != serving else []
        if execs:
            warnings.append(
                f"container {name!r} has {', '.join(f'exec {f}' for f in execs)}: it is not "
                "frozen (kubelet would exec into the frozen container and fail it); add it to "
                f"{ANNOTATION_KEEP_AWAKE} to silence this warning"
            )
            continue
        chosen.append(name)
    return FreezeList(chosen, warnings)
