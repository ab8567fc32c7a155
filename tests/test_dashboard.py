"""config/grafana/freeze-proxy-dashboard.json and the README's metric table match the metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import DaemonMetrics
from freeze_proxy.gate import AppState
from freeze_proxy.metrics import ProxyMetrics

DASHBOARD = (
    Path(__file__).resolve().parent.parent / "config" / "grafana" / "freeze-proxy-dashboard.json"
)
_OURS = re.compile(r"\bfreeze_(?:proxy|daemon)_[a-z_]+")


def families() -> dict[str, str]:
    """Each metric our two programs expose, by the name a query uses -> its type."""
    proxy = ProxyMetrics(
        now=lambda: 0.0,
        in_flight=lambda: 0,
        state=lambda: "awake",
        states=[s.value for s in AppState],
        counters=dict,
    ).render()
    daemon = DaemonMetrics("containerd").render().decode()
    return {
        f.name + ("_total" if f.type == "counter" else ""): f.type
        for f in text_string_to_metric_families(proxy + daemon)
        if f.name.startswith("freeze_")
    }


def exposed() -> set[str]:
    """Every sample name they can expose."""
    suffixes = {"histogram": ("_bucket", "_count", "_sum")}
    return {n + x for n, kind in families().items() for x in suffixes.get(kind, ("",))}


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in expressions(v)]
    if isinstance(node, list):
        return [e for v in node for e in expressions(v)]
    return []


def test_the_dashboard_queries_only_exposed_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = expressions(dashboard["panels"])
    assert len(exprs) >= 6
    used = {name for e in exprs for name in _OURS.findall(e)}
    assert used, "the dashboard asks for none of our metrics"
    assert used <= exposed(), f"unknown metrics in the dashboard: {sorted(used - exposed())}"
    assert {"freeze_proxy_wake_seconds_bucket", "freeze_proxy_resumes_total"} <= used


def test_the_readme_table_lists_exactly_the_exposed_metrics() -> None:
    readme = (DASHBOARD.parents[2] / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(freeze_[a-z_]+)` \| (\w+) \|", section, re.M)
    assert dict(rows) == families()
