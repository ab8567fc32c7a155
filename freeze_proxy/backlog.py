"""How many connections wait in the accept queue of the app's listening socket.

A frozen app cannot ``accept()``, yet the kernel still completes TCP handshakes for it and queues
them. Every ``tcpSocket`` probe of the app leaves one connection there — queue-proxy's readiness
check of the user container (Knative's default probe), kubelet's liveness/readiness probes of the
user container — closed by the prober but still queued. Once the queue holds the app's listen
backlog (128 for aiohttp, 5 for Python's ``http.server``) the kernel drops new SYNs: every TCP
probe times out, queue-proxy reports the pod not ready, and a pod that is not ready gets no
request that would wake it. So while the app is frozen the proxy watches this number and resumes
the app for a moment when connections pile up (see ``FreezeProxy.wake_for_backlog``).

The number comes from ``/proc/net/tcp`` and ``/proc/net/tcp6`` of the pod's network namespace
(shared by its containers): for a LISTEN socket the kernel reports the accept queue's length as
``rx_queue``.
"""

from __future__ import annotations

from pathlib import Path

PROC_NET = Path("/proc/net")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


def queued_connections(table: str, port: int) -> int | None:
    """The longest accept queue of the LISTEN sockets on ``port`` in one ``/proc/net/tcp``
    (or ``tcp6``) table; ``None`` when nothing listens on that port there."""
    longest: int | None = None
    for line in table.splitlines()[1:]:  # the first line is the header
        fields = line.split()
        if len(fields) < 5 or fields[3] != _LISTEN:
            continue
        _, _, local_port = fields[1].rpartition(":")
        tx_rx = fields[4].partition(":")
        try:
            if int(local_port, 16) != port:
                continue
            queued = int(tx_rx[2], 16)
        except ValueError:
            continue
        longest = queued if longest is None else max(longest, queued)
    return longest


def read_queued_connections(port: int, proc_net: Path = PROC_NET) -> int | None:
    """:func:`queued_connections` over IPv4 and IPv6 (an app may listen on both); ``None``
    when no LISTEN socket on ``port`` is visible (or ``/proc/net`` cannot be read)."""
    longest: int | None = None
    for name in ("tcp", "tcp6"):
        try:
            table = (proc_net / name).read_text()
        except OSError:
            continue
        queued = queued_connections(table, port)
        if queued is not None:
            longest = queued if longest is None else max(longest, queued)
    return longest
