"""Kubeconfigs that authenticate as a ServiceAccount, for running our programs against the test
bed's API server with exactly the RBAC a cluster would give them (not the admin certificate)."""

from __future__ import annotations

import json
from pathlib import Path

from testbed.apiserver import ApiServer


def write_token_kubeconfig(
    path: str | Path, *, server: str, ca_file: str | Path, token: str, user: str = "sa"
) -> Path:
    """A kubeconfig for ``server`` (trusting ``ca_file``) that sends ``token`` as a bearer."""
    target = Path(path)
    cluster = {"server": server, "certificate-authority": str(ca_file)}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testbed", "cluster": cluster}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "testbed", "context": {"cluster": "testbed", "user": user}}],
        "current-context": "testbed",
        "preferences": {},
    }
    target.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    target.chmod(0o600)
    return target


def service_account_token(
    api: ApiServer, namespace: str, name: str, *, duration: str = "1h", audience: str = ""
) -> str:
    """A TokenRequest token of ServiceAccount ``namespace/name`` (``kubectl create token``);
    its audience is the API server's own unless ``audience`` is given."""
    args = ["-n", namespace, "create", "token", name, "--duration", duration]
    if audience:
        args += ["--audience", audience]
    return api.kubectl(*args).stdout.strip()


def service_account_kubeconfig(
    api: ApiServer, namespace: str, name: str, path: str | Path, *, duration: str = "1h"
) -> Path:
    """A kubeconfig that acts as ServiceAccount ``namespace/name`` on ``api``."""
    token = service_account_token(api, namespace, name, duration=duration)
    return write_token_kubeconfig(
        path, server=api.url, ca_file=api.ca_file, token=token, user=f"{namespace}-{name}"
    )
