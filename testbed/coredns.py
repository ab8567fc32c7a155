"""Cluster DNS for the test bed's cluster: CoreDNS as a pod behind the ``kube-dns`` Service.

Knative needs ``<svc>.<ns>.svc.cluster.local`` names (the activator dials the autoscaler by
name; the autoscaler probes revisions by name before scaling to zero). Nothing else is needed:
the binary is built with only the plugins the Corefile below uses (scripts/coredns_main.go),
and there is no ``forward``: the machine has no upstream DNS the pods could use. Names outside
the cluster domain get SERVFAIL.

The kubelet must point pods here: ``clusterDNS: [<cluster_ip>]``, ``clusterDomain: <domain>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from . import gobins, oci

COREDNS_VERSION: Final = gobins.pinned_version("COREDNS_VERSION")
IMAGE: Final = f"freeze.local/coredns:{COREDNS_VERSION}"
NAMESPACE: Final = "kube-system"
NAME: Final = "coredns"
CLUSTER_IP: Final = "10.0.0.10"
DOMAIN: Final = "cluster.local"
DNS_PORT: Final = 1053  # unprivileged, so the pod needs no NET_BIND_SERVICE
HEALTH_PORT: Final = 8080
READY_PORT: Final = 8181
CONF_DIR: Final = "/etc/coredns"
LABELS: Final = {"k8s-app": "kube-dns"}  # what tools look for on cluster DNS pods


def coredns_image(binary: Path, out_dir: Path, name: str = IMAGE) -> tuple[str, Path]:
    """CoreDNS's static binary as a one-layer image running as the nonroot user 65532."""
    tar = oci.build_image_tar(
        None,
        name,
        out_dir / "coredns.tar",
        ["/coredns", "-conf", f"{CONF_DIR}/Corefile"],
        files={"/coredns": binary, **oci.nonroot_files(out_dir)},
        user=str(oci.NONROOT_UID),
    )
    return name, tar


def corefile(domain: str = DOMAIN) -> str:
    """Serve the cluster domain and reverse lookups from the API; answer nothing else."""
    return (
        f".:{DNS_PORT} {{\n"
        "    errors\n"
        f"    health :{HEALTH_PORT}\n"
        f"    ready :{READY_PORT}\n"
        f"    kubernetes {domain} in-addr.arpa ip6.arpa {{\n"
        "        pods insecure\n"
        "        fallthrough in-addr.arpa ip6.arpa\n"
        "    }\n"
        "    cache 30\n"
        "}\n"
    )


def _meta(name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": dict(LABELS)}
    if namespaced:
        meta["namespace"] = NAMESPACE
    return meta


def coredns_manifests(
    image: str, cluster_ip: str = CLUSTER_IP, domain: str = DOMAIN
) -> list[dict[str, Any]]:
    """Everything CoreDNS needs, in apply order (RBAC, Corefile, Deployment, Service)."""
    role = f"freeze-testbed:{NAME}"
    container: dict[str, Any] = {
        "name": NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [
            {"name": "dns", "containerPort": DNS_PORT, "protocol": "UDP"},
            {"name": "dns-tcp", "containerPort": DNS_PORT, "protocol": "TCP"},
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "ready", "containerPort": READY_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": READY_PORT},
            "periodSeconds": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": HEALTH_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "failureThreshold": 5,
        },
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "170Mi"}},
        "securityContext": {
            "runAsUser": oci.NONROOT_UID,
            "runAsGroup": oci.NONROOT_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "config", "mountPath": CONF_DIR, "readOnly": True}],
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(NAME)},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": _meta(role, namespaced=False),
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"],
                },
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": _meta(role, namespaced=False),
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(NAME),
            "data": {"Corefile": corefile(domain)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(NAME),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": dict(LABELS)},
                "template": {
                    "metadata": {"labels": dict(LABELS)},
                    "spec": {
                        "serviceAccountName": NAME,
                        # Not ClusterFirst: CoreDNS must not resolve through itself.
                        "dnsPolicy": "Default",
                        "containers": [container],
                        "volumes": [
                            {
                                "name": "config",
                                "configMap": {
                                    "name": NAME,
                                    "items": [{"key": "Corefile", "path": "Corefile"}],
                                },
                            }
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta("kube-dns"),
            "spec": {
                "selector": dict(LABELS),
                "clusterIP": cluster_ip,
                "ports": [
                    {"name": "dns", "port": 53, "targetPort": DNS_PORT, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "targetPort": DNS_PORT, "protocol": "TCP"},
                ],
            },
        },
    ]


def ready_checks() -> list[tuple[str, str]]:
    """``(namespace, Deployment)`` to wait for (Available) before pods need names."""
    return [(NAMESPACE, NAME)]
