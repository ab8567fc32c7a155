"""The webhook <-> proxy contract (freeze_proxy/contract.py) holds end to end: the container the
webhook writes, read by freeze-proxy's own argument parser, is the proxy the pod needs."""

from __future__ import annotations

import ast
import dataclasses
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from freeze_proxy import contract
from freeze_proxy.app import Settings
from freeze_proxy.durations import parse_duration
from tests.knative_pods import knative_pod
from tests.test_mutation import apply_patch, container, env
from webhook.mutation import MutationSettings, mutate

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def proxy_args() -> Iterator[Any]:
    """freeze-proxy's parse_args, without keeping the logging setup it does."""
    from freeze_proxy.__main__ import parse_args

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield parse_args
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_settings_defaults_are_the_cli_defaults(proxy_args: Any) -> None:
    """Settings() (what tests and embedders get) and the command line agree, grace included."""
    assert proxy_args([], env={}) == Settings()
    assert Settings().grace == parse_duration(contract.DEFAULT_GRACE) == 0.25


def test_the_injected_container_is_parsed_into_the_proxy_the_pod_needs(proxy_args: Any) -> None:
    pod = knative_pod(annotations={"freeze-proxy.knative.dev/grace": "2s",
                                   "freeze-proxy.knative.dev/drain-timeout": "30s"})  # fmt: skip
    out = apply_patch(pod, mutate(pod, MutationSettings(proxy_image="img")).patch)
    proxy = container(out, "freeze-proxy")
    proxy_env = {k: v for k, v in env(proxy).items() if isinstance(v, str)}
    settings = proxy_args(proxy["args"], env={**proxy_env, "HOST_IP": "10.0.0.7"})
    # queue-proxy sends to the proxy's listener; kubelet probes its health listener.
    queue_port = int(env(container(out, "queue-proxy"))["USER_PORT"])
    assert settings.listen == f"0.0.0.0:{queue_port}"
    assert settings.health_listen.endswith(f":{proxy['readinessProbe']['httpGet']['port']}")
    assert proxy["readinessProbe"]["httpGet"]["path"] == contract.HEALTH_PATH
    assert settings.upstream == "http://127.0.0.1:8080"
    assert settings.daemon_url == f"http://10.0.0.7:{contract.DAEMON_PORT}"
    assert settings.containers == ["user-container"]
    assert (settings.grace, settings.drain_timeout) == (2.0, 30.0)
    # The token and the state file are where the webhook mounts them.
    mounts = {m["mountPath"]: m["name"] for m in proxy["volumeMounts"]}
    volumes = {v["name"]: v for v in out["spec"]["volumes"]}
    token_dir, token_name = settings.token_file.rsplit("/", 1)
    (source,) = volumes[mounts[token_dir]]["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == token_name
    assert source["serviceAccountToken"]["audience"] == contract.TOKEN_AUDIENCE
    assert "emptyDir" in volumes[mounts[settings.state_file.rsplit("/", 1)[0]]]


def test_contract_is_stdlib_only() -> None:
    """The proxy image carries freeze_proxy and nothing else."""
    tree = ast.parse((ROOT / "freeze_proxy" / "contract.py").read_text())
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= {"__future__", *sys.stdlib_module_names}, imported


def test_webhook_defaults_come_from_the_contract() -> None:
    settings = MutationSettings(proxy_image="x")
    assert (settings.proxy_port, settings.health_port) == (
        contract.PROXY_PORT,
        contract.HEALTH_PORT,
    )
    assert dataclasses.is_dataclass(settings)
