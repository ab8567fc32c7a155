"""Fitting RLIMIT_NOFILE to a server's connection cap (the proxy, the daemon and the webhook).

containerd 2.x no longer raises its own limit, so a container may start with a soft limit of
1024 descriptors: far below a ``--max-connections`` of thousands, and then ``accept`` fails
with EMFILE instead of the documented refusal. The soft limit may be raised up to the hard one
without privileges.
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("freeze_proxy.openfiles")


def raise_open_files_limit(wanted: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to ``wanted`` (at most the hard limit); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft, hard


def fit_open_files(wanted: int) -> int:
    """Make room for ``wanted`` descriptors, or warn (once, at start) how many there are."""
    soft, hard = raise_open_files_limit(wanted)
    if soft < wanted:
        log.warning(
            "RLIMIT_NOFILE is below what --max-connections needs: lower --max-connections or "
            "raise the container's hard limit",
            extra={"soft": soft, "hard": hard, "wanted": wanted},
        )
    return soft
