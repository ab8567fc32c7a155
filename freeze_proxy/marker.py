"""A file that exists while the app may be frozen, so a restarted proxy knows what it left.

If the proxy dies (OOM, SIGKILL) after a pause, kubelet restarts it with the app still frozen; a
proxy that assumed "awake" would then forward a request to a frozen app. The marker is set before
every pause call and cleared after every successful resume; at start-up its presence means "resume
before forwarding". It lives on a memory-backed emptyDir the webhook mounts, which survives
container restarts; the operations are single tmpfs metadata calls (microseconds), done inline so
their order against pause/resume calls is exact.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("freeze_proxy.marker")


class FrozenMarker:
    def __init__(self, path: str) -> None:
        self.path = path
        self.usable = os.path.isdir(os.path.dirname(path) or ".")

    def may_be_frozen(self) -> bool:
        """At start-up: could an earlier instance have left the app frozen?

        Without a usable directory nobody can tell, so the answer is yes: the first request then
        costs one resume (a no-op on an awake app).
        """
        return not self.usable or os.path.exists(self.path)

    def set(self) -> None:
        """Before a pause call. Raises OSError: then the pause must not be attempted."""
        if self.usable:
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))

    def clear(self) -> None:
        """After a successful resume."""
        if self.usable:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:  # harmless: a restart would only resume once more
                log.warning(
                    "cannot remove the frozen marker", extra={"path": self.path, "err": str(exc)}
                )
