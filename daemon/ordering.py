"""Per pod, carry calls out in the order their caller sent them (pure: no I/O, no clock).

A pause that timed out on the proxy is still carried out by the daemon, maybe after a later
resume that came on another connection: the app would end frozen while the proxy believes it
awake. So the proxy stamps every call with a sequence number (header ``Freeze-Sequence``: its
CLOCK_MONOTONIC in ns, shared by every container of the node, so it keeps increasing across proxy
restarts), and the daemon refuses a call older than one it already carried out for that pod.

The pod is the one the token proves. Entries expire (a late call is late by seconds, the entries
live for minutes) and their number is bounded, dropping the least recently used.
"""

from __future__ import annotations

from collections import OrderedDict

from freeze_proxy.contract import SEQUENCE_HEADER

MAX_SEQUENCE = 2**64 - 1


def parse_sequence(text: str | None) -> int | None:
    """The header's value: None when absent (Knative's protocol: no ordering), else a decimal
    number from 0 to 2^64-1. Raise ValueError naming the header and the form."""
    if text is None:
        return None
    value = text.strip()
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_SEQUENCE:
        raise ValueError(
            f"bad {SEQUENCE_HEADER} header {text!r}: expected a decimal number from 0 to 2^64-1 "
            "(the caller's CLOCK_MONOTONIC in ns), or no header"
        )
    return int(value)


class CallOrder:
    """The highest sequence carried out per pod."""

    def __init__(self, max_pods: int = 10_000, ttl: float = 600.0) -> None:
        self.max_pods = max_pods
        self.ttl = ttl
        self._seen: OrderedDict[str, tuple[int, float]] = OrderedDict()  # uid -> (seq, when)

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, pod_uid: str, sequence: int, now: float) -> int | None:
        """None: go ahead (the call is recorded as carried out). Otherwise the newer sequence
        already carried out for this pod: refuse the call. An equal sequence is the same call
        sent again, and goes ahead."""
        self._expire(now)
        seen = self._seen.get(pod_uid)
        if seen is not None and sequence < seen[0]:
            return seen[0]
        self._seen[pod_uid] = (sequence, now)
        self._seen.move_to_end(pod_uid)
        while len(self._seen) > self.max_pods:
            self._seen.popitem(last=False)
        return None

    def _expire(self, now: float) -> None:
        while self._seen:
            _, (_, when) = next(iter(self._seen.items()))
            if now - when <= self.ttl:
                return
            self._seen.popitem(last=False)
