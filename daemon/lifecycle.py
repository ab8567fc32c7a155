"""The daemon's start: thaw what a previous instance left paused when it died without its stop.

A daemon killed (OOM, SIGKILL, node trouble) cannot thaw on its way out, and the frozen apps'
sidecars cannot wake them while no daemon runs. So before a new daemon serves, it resumes every
paused container of the node's pods that carry our sidecar — only ours (``leftovers.to_thaw``):
someone else's paused container is not our business.
"""

from __future__ import annotations

import asyncio
import logging

from daemon.leftovers import to_thaw
from daemon.runtimes import ContainerNotFound, ListedContainer, Runtime

log = logging.getLogger("daemon.lifecycle")

# How long the start may spend on it: a node has tens of pods, each resume takes milliseconds.
START_THAW_BUDGET = 10.0


async def thaw_left_frozen(runtime: Runtime, budget: float = START_THAW_BUDGET) -> dict[str, str]:
    """Resume the paused containers of our pods on this node; container id -> outcome
    (``start_thawed``, ``start_thaw_not_found``, ``start_thaw_failed``). A runtime that cannot
    list is logged and the daemon serves anyway (each pod's own resume still thaws it)."""
    outcomes: dict[str, str] = {}
    try:
        async with asyncio.timeout(budget):
            found = to_thaw(await runtime.list_containers())
            await asyncio.gather(*(_resume(runtime, c, outcomes) for c in found))
    except TimeoutError:
        log.error(
            f"start: thawing what a previous daemon left paused took over {budget:g} s; serving "
            "anyway (each pod's next resume thaws it)",
            extra={"outcome": "start_thaw_timeout", "thawed": len(outcomes)},
        )
    except Exception as e:
        log.error(
            "start: cannot list this node's containers to thaw what a previous daemon left "
            "paused; serving anyway (each pod's next resume thaws it); check the runtime socket",
            extra={"outcome": "start_thaw_failed", "error": f"{type(e).__name__}: {e}"},
        )
    else:
        log.info(
            "start: nothing of ours left paused" if not found else "start: thawed leftovers",
            extra={"containers": len(found)},
        )
    return outcomes


async def _resume(runtime: Runtime, c: ListedContainer, outcomes: dict[str, str]) -> None:
    who = {
        "pod_uid": c.pod_uid,
        "pod_name": c.pod_name,
        "namespace": c.namespace,
        "container": c.name,
        "container_id": c.container_id,
        "was": c.status,
    }
    try:
        await runtime.resume_container(c.container_id)
    except ContainerNotFound as e:
        outcomes[c.container_id] = "start_thaw_not_found"
        log.info(
            "start: a paused container is gone already",
            extra={**who, "outcome": "start_thaw_not_found", "error": str(e)},
        )
    except Exception as e:
        outcomes[c.container_id] = "start_thaw_failed"
        log.error(
            "start: cannot thaw a container a previous daemon left paused",
            extra={**who, "outcome": "start_thaw_failed", "error": f"{type(e).__name__}: {e}"},
        )
    else:
        outcomes[c.container_id] = "start_thawed"
        log.warning(
            "start: thawed a container a previous daemon left paused (it died without its "
            "graceful stop)",
            extra={**who, "outcome": "start_thawed"},
        )
