"""How many connections wait in the accept queue of the app's listening socket.

A frozen app cannot ``accept()``, yet the kernel still completes TCP handshakes for it and queues
them. Every ``tcpSocket`` probe of the app leaves one connection there — kubelet's
liveness/readiness probes of the user container, queue-proxy's readiness check in a pod the
webhook did not rewrite (Knative's default probe; it rewrites it to freeze-proxy's ``/ready``,
see readiness.py) — closed by the prober but still queued. Once the queue holds the app's listen
backlog (128 for aiohttp, 5 for Python's ``http.server``) the kernel drops new SYNs: every TCP
probe times out, queue-proxy reports the pod not ready, and a pod that is not ready gets no
request that would wake it. So while the app is frozen the proxy watches this number and resumes
the app for a moment when connections pile up (see ``FreezeProxy.wake_for_backlog``).

The number comes from the kernel's socket diagnostics (netlink ``SOCK_DIAG_BY_FAMILY``, what
``ss -ltn`` uses), asked for LISTEN sockets on one port in the pod's network namespace: for a
listening socket ``idiag_rqueue`` is the accept queue's length and ``idiag_wqueue`` its limit
(the app's listen backlog, capped by ``net.core.somaxconn``). That query walks only the
listening sockets (~35 µs); reading ``/proc/net/tcp`` walks the node's whole TCP hash table
(~3 ms of CPU on a 24 GiB node, every check, in every frozen pod).
"""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_NO_COOKIE = struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)  # INET_DIAG_NOCOOKIE


class AcceptQueue(NamedTuple):
    queued: int  # connections the app has not accepted yet
    limit: int  # the kernel drops new handshakes beyond this (the app's listen backlog)


def wake_at(threshold: int, limit: int) -> int:
    """How many queued connections wake the app: ``threshold``, but at most half the queue's
    limit, so an app with a tiny backlog (Python's ``http.server``: 5) still has room for the
    probes that arrive before the next check."""
    return max(1, min(threshold, limit // 2))


def _request(family: int, port: int) -> bytes:
    """An inet_diag_req_v2 for the LISTEN TCP sockets of ``family`` on source port ``port``."""
    sockid = struct.pack("!HH", port, 0) + bytes(32) + struct.pack("=I", 0) + _NO_COOKIE
    body = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 1 << _TCP_LISTEN) + sockid
    return _HEADER.pack(_HEADER.size + len(body), _SOCK_DIAG_BY_FAMILY,
                        _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body  # fmt: skip


def read_accept_queue(port: int) -> AcceptQueue | None:
    """The accept queue of the LISTEN sockets on ``port`` (IPv4 and IPv6: an app may listen on
    both; the longest queue and the smallest limit); ``None`` when nothing listens there. Raises
    OSError if the kernel refuses the query. One non-blocking netlink round trip per family:
    fine on the event loop."""
    longest: int | None = None
    smallest = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            nl.send(_request(family, port))
            done = False
            while not done:
                data = nl.recv(65536)
                offset = 0
                while offset + _HEADER.size <= len(data):
                    length, kind = _HEADER.unpack_from(data, offset)[:2]
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        errno = -struct.unpack_from("=i", data, offset + _HEADER.size)[0]
                        raise OSError(errno, f"sock_diag: {os.strerror(errno)}")
                    # struct inet_diag_msg: family, state, timer, retrans, sockid (48 bytes:
                    # sport first), expires, rqueue, wqueue, ...
                    msg = offset + _HEADER.size
                    state = data[msg + 1]
                    (sport,) = struct.unpack_from("!H", data, msg + 4)
                    queued, limit = struct.unpack_from("=II", data, msg + 4 + 48 + 4)
                    if state == _TCP_LISTEN and sport == port:
                        if longest is None:
                            longest, smallest = queued, limit
                        else:
                            longest, smallest = max(longest, queued), min(smallest, limit)
                    offset += (length + 3) & ~3
    return None if longest is None else AcceptQueue(longest, smallest)
