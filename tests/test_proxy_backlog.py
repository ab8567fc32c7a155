"""freeze_proxy.backlog: the accept queue of the app's listening socket, from sock_diag.

A frozen app's queue fills with TCP probes (see the module); the proxy resumes the app when it
does. Here: the kernel's own numbers for a socket that does not accept, like a frozen app, over
IPv4 and IPv6, and a port nobody listens on. The whole loop on real parts is in
tests/test_queueproxy_freeze.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from freeze_proxy.__main__ import parse_args
from freeze_proxy.backlog import AcceptQueue, read_accept_queue, wake_at


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket that never accepts: what a frozen app looks like to the kernel."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


def test_the_kernel_queues_connections_a_frozen_app_cannot_accept(
    listener: socket.socket,
) -> None:
    port = listener.getsockname()[1]
    assert read_accept_queue(port) == AcceptQueue(queued=0, limit=8)
    clients = []
    try:
        for n in range(1, 6):
            # Like a TCP probe: the handshake completes although nobody accepts...
            client = socket.create_connection(("127.0.0.1", port), timeout=2)
            clients.append(client)
            assert read_accept_queue(port) == (n, 8)
        # ... and a probe that closes its connection leaves it queued all the same.
        for client in clients:
            client.close()
        assert read_accept_queue(port) == (5, 8)
        listener.settimeout(2)
        listener.accept()[0].close()
        assert read_accept_queue(port) == (4, 8)
    finally:
        for client in clients:
            client.close()


def test_ipv6_listeners_count_and_an_unused_port_is_none(listener: socket.socket) -> None:
    with socket.socket(socket.AF_INET6) as v6:
        v6.bind(("::1", 0))
        v6.listen(4)
        port = v6.getsockname()[1]
        with socket.create_connection(("::1", port), timeout=2):
            assert read_accept_queue(port) == (1, 4)
    assert read_accept_queue(port) is None


def test_wake_backlog_flag() -> None:
    assert parse_args([], env={}).wake_backlog == 4
    assert parse_args(["--wake-backlog", "0"], env={}).wake_backlog == 0
    assert parse_args(["--wake-backlog", "64"], env={}).wake_backlog == 64
    with pytest.raises(SystemExit):
        parse_args(["--wake-backlog", "-1"], env={})


@pytest.mark.parametrize(
    ("threshold", "limit", "wake"),
    [(4, 128, 4), (4, 4096, 4), (4, 5, 2), (4, 8, 4), (64, 128, 64), (4, 1, 1), (4, 0, 1)],
)
def test_the_app_wakes_at_the_threshold_or_half_its_queue(
    threshold: int, limit: int, wake: int
) -> None:
    """Python's http.server listens with a backlog of 5: waiting for 4 could let the probes
    that arrive before the next check (every 2 s) overflow it."""
    assert wake_at(threshold, limit) == wake
