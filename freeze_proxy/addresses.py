"""``HOST:PORT`` addresses, read and written alike by the three programs' flags and URLs."""

from __future__ import annotations

WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    """'0.0.0.0:8080', '[::]:8443' or ':9999' -> (host, port); no host means every interface.
    Raise ValueError naming ``flag`` and the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{flag} {value!r}: expected HOST:PORT with a port from 1 to 65535, e.g. 0.0.0.0:8080"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_host(host: str) -> str | None:
    """What to bind for a listen host: None (every address family the host has: IPv4 and IPv6
    where there is IPv6) for a wildcard — empty, ``0.0.0.0`` or ``::``, as Go's ``net.Listen``
    reads them — else the address itself (``::1`` is IPv6 only, ``127.0.0.1`` IPv4 only)."""
    return None if host in WILDCARDS else host


def host_port(host: str, port: int) -> str:
    """``host:port`` for a URL or a Host header: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
