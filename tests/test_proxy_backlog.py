"""freeze_proxy.backlog: the accept queue of the app's listening socket, from /proc/net/tcp.

A frozen app's queue fills with TCP probes (see the module); the proxy resumes the app when it
does. Here: the parser on the kernel's format, and the kernel's own numbers for a socket that
does not accept, like a frozen app. The whole loop on real parts is in
tests/test_queueproxy_freeze.py.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from freeze_proxy.__main__ import parse_args
from freeze_proxy.backlog import queued_connections, read_queued_connections

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)


def row(local: str, state: str, rx: int, remote: str = "00000000:0000") -> str:
    return (
        f"   0: {local} {remote} {state} 00000000:{rx:08X} 00:00000000 00000000     0        0 "
        "12345 1 0000000000000000 100 0 0 10 0\n"
    )


def test_parses_the_listen_sockets_of_one_port() -> None:
    table = (
        HEADER
        + row("0100007F:1F90", "0A", 7)  # 127.0.0.1:8080 LISTEN, 7 waiting
        + row("00000000:1F90", "0A", 3)  # 0.0.0.0:8080 LISTEN (another socket, SO_REUSEPORT)
        + row("0100007F:1F90", "01", 99, "0100007F:D431")  # an ESTABLISHED one: not counted
        + row("0100007F:270F", "0A", 50)  # another port
    )
    assert queued_connections(table, 8080) == 7
    assert queued_connections(table, 9999) == 50
    assert queued_connections(table, 1234) is None
    assert queued_connections(HEADER, 8080) is None
    assert queued_connections("", 8080) is None
    assert queued_connections(HEADER + "garbage line\n" + row("0:ZZ", "0A", 1), 8080) is None


def test_reads_ipv4_and_ipv6_tables(tmp_path: Path) -> None:
    (tmp_path / "tcp").write_text(HEADER + row("00000000:1F90", "0A", 2))
    (tmp_path / "tcp6").write_text(HEADER + row("00000000000000000000000000000000:1F90", "0A", 9))
    assert read_queued_connections(8080, tmp_path) == 9
    (tmp_path / "tcp6").unlink()
    assert read_queued_connections(8080, tmp_path) == 2
    assert read_queued_connections(8081, tmp_path) is None
    assert read_queued_connections(8080, tmp_path / "missing") is None


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
    assert read_queued_connections(port) == 0
    clients = []
    try:
        for n in range(1, 6):
            # Like a TCP probe: the handshake completes although nobody accepts...
            client = socket.create_connection(("127.0.0.1", port), timeout=2)
            clients.append(client)
            assert read_queued_connections(port) == n
        # ... and a probe that closes its connection leaves it queued all the same.
        for client in clients:
            client.close()
        assert read_queued_connections(port) == 5
        listener.settimeout(2)
        listener.accept()[0].close()
        assert read_queued_connections(port) == 4
    finally:
        for client in clients:
            client.close()


def test_wake_backlog_flag() -> None:
    assert parse_args([], env={}).wake_backlog == 4
    assert parse_args(["--wake-backlog", "0"], env={}).wake_backlog == 0
    assert parse_args(["--wake-backlog", "64"], env={}).wake_backlog == 64
    with pytest.raises(SystemExit):
        parse_args(["--wake-backlog", "-1"], env={})
