"""What must not stay frozen once this daemon is gone: pure bookkeeping and decisions, no I/O.

A frozen app whose daemon went away (uninstalled, upgraded, crashed) can never be woken: its
sidecar's resume finds no daemon. So a daemon that stops thaws what it holds frozen
(:class:`HeldFrozen`), and a daemon that starts thaws what a dead one left paused
(:func:`to_thaw`) — only in pods that carry our sidecar, never someone else's pause.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from daemon.runtimes import ListedContainer
from freeze_proxy.contract import SIDECAR_NAME

# Tasks API states in which a container is (or is becoming) frozen.
PAUSED_STATES = frozenset({"PAUSED", "PAUSING"})


@dataclass(frozen=True, slots=True)
class Held:
    """A pod this daemon may have frozen: who it is (for the logs) and every container
    narrowing (``?container=``; empty: the whole pod) frozen since its last full thaw."""

    pod_uid: str
    who: Mapping[str, str]
    narrowings: tuple[tuple[str, ...], ...]


class HeldFrozen:
    """Pods this daemon may have frozen and not thawed since.

    Marked before the freeze reaches the runtime (a failed or timed-out freeze may have frozen
    some containers), cleared only by a thaw that succeeded for every narrowing frozen (or for
    the whole pod). Bounded: past ``max_pods`` the oldest entry goes (a daemon that starts later
    still finds it paused).
    """

    def __init__(self, *, max_pods: int = 10_000) -> None:
        self._max = max_pods
        self._held: OrderedDict[str, Held] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def freezing(self, pod_uid: str, who: Mapping[str, str], containers: Sequence[str]) -> None:
        """A freeze of ``containers`` is about to be carried out: from now on it may be frozen."""
        narrowing = tuple(containers)
        held = self._held.get(pod_uid)
        narrowings = () if held is None else held.narrowings
        if narrowing not in narrowings:
            narrowings = (*narrowings, narrowing)
        self._held[pod_uid] = Held(pod_uid, dict(who), narrowings)
        self._held.move_to_end(pod_uid)
        while len(self._held) > self._max:
            self._held.popitem(last=False)

    def thawed(self, pod_uid: str, containers: Sequence[str]) -> None:
        """A thaw of ``containers`` succeeded (empty: every container the daemon may freeze)."""
        held = self._held.get(pod_uid)
        if held is None:
            return
        left = () if not containers else tuple(n for n in held.narrowings if n != tuple(containers))
        if left:
            self._held[pod_uid] = Held(pod_uid, held.who, left)
        else:
            del self._held[pod_uid]

    def pods(self) -> list[Held]:
        return list(self._held.values())


def to_thaw(
    listing: Iterable[ListedContainer], sidecar: str = SIDECAR_NAME
) -> list[ListedContainer]:
    """The paused containers a daemon that starts must resume: those of pods (by UID) that
    carry a container named ``sidecar``. Containers of other pods — paused by someone else —
    and containers without a pod UID (not kubelet's) are left alone."""
    listed = [c for c in listing if c.pod_uid]
    ours = {c.pod_uid for c in listed if c.name == sidecar}
    return [c for c in listed if c.pod_uid in ours and c.status in PAUSED_STATES]
