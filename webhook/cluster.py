"""The Kubernetes API calls the webhook makes, behind small Protocols.

``Cluster`` is what the TLS bootstrap depends on; tests use an in-memory fake and a later test bed
can point ``KubeCluster`` at a real kube-apiserver. ``KubeCluster`` uses the synchronous
``kubernetes`` client in worker threads: pyproject allows kubernetes>=30, which has no
``kubernetes.aio``, and the webhook makes a handful of calls (at start and every few minutes), so
threads keep the event loop free at no cost.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
from dataclasses import dataclass
from typing import Any, Protocol


class ConflictError(Exception):
    """The object changed (or appeared) since it was read: re-read and decide again."""


@dataclass(frozen=True)
class StoredSecret:
    """A Secret's data (decoded) and the resourceVersion to write it back with."""

    data: dict[str, bytes]
    resource_version: str


class Cluster(Protocol):
    """What the certificate bootstrap needs from the API server."""

    async def read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        """The Secret, or None when it does not exist."""
        ...

    async def write_secret(
        self, namespace: str, name: str, data: dict[str, bytes], resource_version: str | None
    ) -> None:
        """Set the data (with optimistic concurrency) or, when resource_version is None, create.

        Only ``data`` changes: the Secret's labels, annotations (kubectl's
        last-applied-configuration among them) and type stay as installed. Raise ConflictError
        when someone else wrote first.
        """
        ...

    async def read_ca_bundles(self, webhook_config: str) -> list[tuple[str, bytes]]:
        """(webhook name, caBundle) for each webhook of the MutatingWebhookConfiguration."""
        ...

    async def patch_ca_bundles(
        self, webhook_config: str, bundles: dict[int, tuple[str, bytes]]
    ) -> None:
        """Set caBundle of the webhooks at these indexes (guarded by their names)."""
        ...


class ConfigMapReader(Protocol):
    """What the cluster defaults need from the API server."""

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        """The ConfigMap's data, or None when it does not exist."""
        ...


def ca_bundle_patch(bundles: dict[int, tuple[str, bytes]]) -> list[dict[str, Any]]:
    """JSON Patch: for each index, test the webhook's name then replace its caBundle.

    The test op makes a concurrent reorder of the webhooks fail the patch instead of writing our
    CA into someone else's webhook.
    """
    ops: list[dict[str, Any]] = []
    for index, (name, bundle) in sorted(bundles.items()):
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": name})
        ops.append(
            {
                "op": "add",  # add replaces an existing member and creates a missing one
                "path": f"/webhooks/{index}/clientConfig/caBundle",
                "value": base64.b64encode(bundle).decode(),
            }
        )
    return ops


def secret_data_patch(data: dict[str, bytes], resource_version: str) -> list[dict[str, Any]]:
    """JSON Patch: set the Secret's whole ``data``, only if it is still at ``resource_version``.

    A patch rather than a replace (PUT) so that everything else the Secret carries survives: a
    PUT of a fresh object would drop the labels config/ gives it and kubectl's
    last-applied-configuration annotation (every later ``kubectl apply`` then warns and
    re-patches, and a GitOps tool sees drift after each rotation). A resourceVersion in the
    patched object is a precondition: the API server answers 409 when the Secret moved on.
    """
    return [
        {"op": "replace", "path": "/metadata/resourceVersion", "value": resource_version},
        {
            "op": "add",  # add replaces an existing member and creates a missing one
            "path": "/data",
            "value": {k: base64.b64encode(v).decode() for k, v in data.items()},
        },
    ]


def _module(name: str) -> Any:
    """Import lazily and untyped: the client's typing differs across the versions we allow."""
    return importlib.import_module(name)


class KubeCluster:
    """``Cluster`` over the official kubernetes client (in-cluster config or a kubeconfig)."""

    def __init__(self, api_client: Any) -> None:
        client = _module("kubernetes.client")
        self._client = client
        self._core = client.CoreV1Api(api_client)
        self._admission = client.AdmissionregistrationV1Api(api_client)

    @classmethod
    def from_config(cls, kubeconfig: str | None) -> KubeCluster:
        """In-cluster service account when no kubeconfig is given."""
        client = _module("kubernetes.client")
        config = _module("kubernetes.config")
        if kubeconfig:
            api_client = config.new_client_from_config(config_file=kubeconfig)
        else:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        return cls(api_client)

    def _status(self, err: BaseException) -> int | None:
        if isinstance(err, self._client.exceptions.ApiException):
            status = err.status
            return int(status) if status is not None else None
        return None

    async def read_secret(self, namespace: str, name: str) -> StoredSecret | None:
        try:
            secret = await asyncio.to_thread(self._core.read_namespaced_secret, name, namespace)
        except Exception as err:
            if self._status(err) == 404:
                return None
            raise
        data = {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}
        return StoredSecret(data, str(secret.metadata.resource_version or ""))

    async def read_config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            cm = await asyncio.to_thread(
                self._core.read_namespaced_config_map, name, namespace, _request_timeout=5
            )
        except Exception as err:
            if self._status(err) == 404:
                return None
            raise
        return {str(k): str(v) for k, v in (cm.data or {}).items()}

    async def write_secret(
        self, namespace: str, name: str, data: dict[str, bytes], resource_version: str | None
    ) -> None:
        c = self._client
        try:
            if resource_version is None:
                body = c.V1Secret(
                    api_version="v1",
                    kind="Secret",
                    metadata=c.V1ObjectMeta(name=name, namespace=namespace),
                    type="Opaque",
                    data={k: base64.b64encode(v).decode() for k, v in data.items()},
                )
                await asyncio.to_thread(self._core.create_namespaced_secret, namespace, body)
            else:
                await asyncio.to_thread(
                    self._core.patch_namespaced_secret,
                    name,
                    namespace,
                    secret_data_patch(data, resource_version),
                )
        except Exception as err:
            if self._status(err) in (409, 422):
                raise ConflictError(f"secret {namespace}/{name} changed concurrently") from err
            raise

    async def read_ca_bundles(self, webhook_config: str) -> list[tuple[str, bytes]]:
        mwc = await asyncio.to_thread(
            self._admission.read_mutating_webhook_configuration, webhook_config
        )
        result = []
        for hook in mwc.webhooks or []:
            raw = hook.client_config.ca_bundle if hook.client_config else None
            # The client returns caBundle (a []byte) either decoded or as base64 text.
            if isinstance(raw, str):
                raw = base64.b64decode(raw)
            result.append((str(hook.name), bytes(raw or b"")))
        return result

    async def patch_ca_bundles(
        self, webhook_config: str, bundles: dict[int, tuple[str, bytes]]
    ) -> None:
        try:
            await asyncio.to_thread(
                self._admission.patch_mutating_webhook_configuration,
                webhook_config,
                ca_bundle_patch(bundles),
            )
        except Exception as err:
            if self._status(err) in (409, 422):
                raise ConflictError(f"{webhook_config} changed concurrently") from err
            raise
