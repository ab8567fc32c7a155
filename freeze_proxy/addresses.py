"""``HOST:PORT`` listen addresses, read alike by the ``--listen`` flags of all three programs."""

from __future__ import annotations


def parse_listen(value: str, flag: str = "--listen") -> tuple[str, int]:
    """'0.0.0.0:8080', '[::]:8443' or ':9999' -> (host, port); no host means every interface.
    Raise ValueError naming ``flag`` and the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{flag} {value!r}: expected HOST:PORT with a port from 1 to 65535, e.g. 0.0.0.0:8080"
        )
    return host.strip("[]") or "0.0.0.0", int(port)
