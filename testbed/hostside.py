"""What a real node changes on the host, captured before the cluster starts and undone after.

The kubelet, the CNI plugins, kube-proxy and kube-controller-manager write outside their own
directories (see shared/notes/node.md, "Side effects to restore"): sysctls, nftables tables and
chains, nfacct counters, a cgroup root in every hierarchy, a bridge, and a few host paths.
``HostSnapshot.capture()`` records the host's state before; ``restore()`` undoes every change it
can (never stopping at the first error) and ``leftovers()`` says what still differs, so a test can
assert that the machine was left as found. The bridge and the cgroup root are the test bed's own
names: whatever exists under them is ours and is always removed.

Pure parts (netlink messages, nft JSON, path and sysctl diffs) are separate from the I/O.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .mounts import unmount_under

CGROUP_MOUNT_ROOT = Path("/sys/fs/cgroup")


class HostsideError(RuntimeError):
    """A host change could not be made or undone."""


def _run(argv: Sequence[str], *, input_text: str | None = None) -> str:
    """Run a host tool; raise with its stderr (the cause) when it fails."""
    try:
        proc = subprocess.run(
            list(argv), input=input_text, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as err:
        pkg = {"ip": "iproute2", "nft": "nftables"}.get(argv[0], argv[0])
        raise HostsideError(f"{argv[0]} not found: apt-get install {pkg}") from err
    if proc.returncode:
        raise HostsideError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


# --- bridge ------------------------------------------------------------------------------------


def is_our_bridge(links: Sequence[Mapping[str, Any]], cidr: str) -> bool:
    """Whether ``ip -j -d addr show <name>`` output is a bridge carrying exactly ``cidr``."""
    want = ipaddress.ip_interface(cidr)
    for link in links:
        if link.get("linkinfo", {}).get("info_kind") != "bridge":
            return False
        for a in link.get("addr_info", []):
            if ipaddress.ip_interface(f"{a.get('local')}/{a.get('prefixlen')}") == want:
                return True
    return False


def _link(name: str) -> list[dict[str, Any]] | None:
    """``ip -j -d addr show`` of one link, None when it does not exist."""
    proc = subprocess.run(
        ["ip", "-j", "-d", "addr", "show", "dev", name], capture_output=True, text=True, check=False
    )
    if proc.returncode:
        return None  # "Device ... does not exist."
    result: list[dict[str, Any]] = json.loads(proc.stdout or "[]")
    return result or None


def bridge_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def create_bridge(name: str, cidr: str) -> None:
    """Create bridge ``name`` with address ``cidr`` (e.g. 10.244.7.1/24) and bring it up.

    A bridge of that name with that address is reused (a crashed run's); anything else of that
    name is someone else's and is left alone.
    """
    ipaddress.ip_interface(cidr)  # ValueError names a malformed cidr
    links = _link(name)
    if links is not None:
        if not is_our_bridge(links, cidr):
            raise HostsideError(
                f"a link named {name} exists and is not a bridge with {cidr}: pick another "
                f"bridge name, or delete it (ip link del {name}) if it is a test bed's leftover"
            )
    else:
        _run(["ip", "link", "add", name, "type", "bridge"])
        _run(["ip", "addr", "add", cidr, "dev", name])
    _run(["ip", "link", "set", name, "up"])


def delete_bridge(name: str) -> None:
    """Delete the bridge (its veths go with it); nothing to do when it is gone."""
    if bridge_exists(name):
        _run(["ip", "link", "del", name])


# --- cgroups -----------------------------------------------------------------------------------


def cgroup_hierarchies(mountinfo: str | None = None) -> list[Path]:
    """Mount points of every cgroup (v1) and cgroup2 hierarchy, each real dir once.

    From mountinfo rather than a listing of /sys/fs/cgroup, so that ``cpu -> cpu,cpuacct``
    symlinks count once and a pure v2 host (the root itself is cgroup2) works too.
    """
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    seen: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep or right.split()[0] not in ("cgroup", "cgroup2"):
            continue
        point = left.split()[4]
        seen.setdefault(os.path.realpath(point), Path(point))
    return sorted(seen.values())


def _rel(name: str) -> str:
    rel = name.strip("/")
    if not rel or ".." in rel.split("/"):
        raise HostsideError(f"bad cgroup root {name!r}: give a name such as /freeze-node")
    return rel


def make_cgroup_root(name: str) -> None:
    """Create the kubelet's ``cgroupRoot`` in every hierarchy; in cpuset copy the parent's cpus
    and mems into each new level (the kubelet refuses to start otherwise)."""
    rel = _rel(name)
    for h in cgroup_hierarchies():
        path = h
        for part in rel.split("/"):
            parent, path = path, path / part
            path.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                here = path / knob
                if here.exists() and not here.read_text().strip():
                    here.write_text((parent / knob).read_text())


def remove_cgroup_tree(path: Path) -> None:
    """Remove a cgroup dir and its children (cgroup dirs only support rmdir, leaves first)."""
    if not path.is_dir():
        return
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        remove_cgroup_tree(child)
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)  # tasks still leaving the cgroup
    path.rmdir()


def _walk_dirs(top: Path) -> Iterator[Path]:
    """``top`` and every cgroup below it, parents first."""
    if not top.is_dir():
        return
    yield top
    for child in sorted(p for p in top.iterdir() if p.is_dir()):
        yield from _walk_dirs(child)


def _thaw(top: Path) -> None:
    """Thaw every frozen cgroup below ``top`` (parents first: a child of a frozen parent stays
    frozen), v1 freezer.state and v2 cgroup.freeze alike; frozen tasks cannot die."""
    for d in _walk_dirs(top):
        with contextlib.suppress(OSError):
            if (d / "freezer.state").exists():
                if (d / "freezer.state").read_text().strip() != "THAWED":
                    (d / "freezer.state").write_text("THAWED")
            elif (d / "cgroup.freeze").exists() and (
                d / "cgroup.freeze"
            ).read_text().strip() != "0":
                (d / "cgroup.freeze").write_text("0")


def _pids(tops: Iterable[Path]) -> set[int]:
    found: set[int] = set()
    for top in tops:
        for d in _walk_dirs(top):
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
    return found


def remove_cgroup_root(name: str, timeout: float = 10.0) -> list[str]:
    """Remove the cgroup root's whole subtree in every hierarchy (v1 and unified): thaw it, kill
    the processes a crashed test left in it (SIGKILL, waiting for them), then rmdir leaves first.
    Returns the errors; an absent root is not one."""
    rel = _rel(name)
    tops = [h / rel for h in cgroup_hierarchies()]
    errors: list[str] = []
    for top in tops:
        _thaw(top)
    deadline = time.monotonic() + timeout
    killed: set[int] = set()
    while pids := _pids(tops):
        if time.monotonic() > deadline:
            errors.append(f"processes {sorted(pids)} would not leave cgroup {rel} after SIGKILL")
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        killed |= pids
        for top in tops:
            _thaw(top)  # a task that moved into a frozen child meanwhile
        time.sleep(0.05)
    if killed:
        errors.append(f"killed processes left in cgroup {rel}: {sorted(killed)}")
    for top in tops:
        try:
            remove_cgroup_tree(top)
        except OSError as err:
            errors.append(f"could not remove cgroup {top}: {err}")
    return errors


def cgroup_root_leftovers(name: str) -> list[str]:
    return [str(h / _rel(name)) for h in cgroup_hierarchies() if (h / _rel(name)).exists()]


# --- sysctls -----------------------------------------------------------------------------------

# What the kubelet (setupKernelTunables), the bridge plugin (isGateway: forwarding), portmap
# (route_localnet) and kube-proxy (route_localnet, conntrack limits and timeouts) may set.
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    # ip_forward first: writing it (or conf.all.forwarding) resets every interface's forwarding.
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv6.conf.all.forwarding",
    "net.ipv6.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv4.conf.default.route_localnet",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_tcp_be_liberal",
    "net.netfilter.nf_conntrack_udp_timeout",
    "net.netfilter.nf_conntrack_udp_timeout_stream",
)
# Not a sysctl, but kube-proxy sets it with its conntrack limit.
CONNTRACK_HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"
_PER_INTERFACE = (
    "net/ipv4/conf/{}/forwarding",
    "net/ipv4/conf/{}/route_localnet",
    "net/ipv6/conf/{}/forwarding",
)


def sysctl_path(name: str) -> str:
    """/proc/sys file of a dotted sysctl name (names of interfaces with dots need paths)."""
    return "/proc/sys/" + name.replace(".", "/")


def tunable_paths(interfaces: Iterable[str], exclude: str = "") -> list[str]:
    """Files to capture, in restore order: the globals, net.bridge.*, then each interface's
    (after the globals, which propagate to them)."""
    paths = [sysctl_path(n) for n in SYSCTLS]
    bridge = Path("/proc/sys/net/bridge")
    if bridge.is_dir():
        paths += sorted(str(p) for p in bridge.iterdir())
    paths.append(CONNTRACK_HASHSIZE)
    for ifname in sorted(interfaces):
        if ifname not in ("all", "default", exclude):
            paths += ["/proc/sys/" + t.format(ifname) for t in _PER_INTERFACE]
    return paths


def read_tunables(paths: Iterable[str]) -> dict[str, str | None]:
    """Current values (None: the file does not exist)."""
    values: dict[str, str | None] = {}
    for p in paths:
        try:
            values[p] = Path(p).read_text().strip()
        except OSError:
            values[p] = None
    return values


def changed_tunables(
    before: Mapping[str, str | None], now: Mapping[str, str | None]
) -> dict[str, str]:
    """The files whose value differs from ``before`` (those absent then or now cannot be put
    back: an interface or module that came or went)."""
    return {
        p: old
        for p, old in before.items()
        if old is not None and now.get(p) is not None and now[p] != old
    }


def restore_tunables(before: Mapping[str, str | None]) -> list[str]:
    """Write back every changed value, in order, re-reading each one just before (writing
    ip_forward changes the interfaces' forwarding too)."""
    errors: list[str] = []
    for p, old in before.items():
        for path, value in changed_tunables({p: old}, read_tunables([p])).items():
            try:
                Path(path).write_text(value)
            except OSError as err:
                errors.append(f"could not restore {path} to {value}: {err}")
    return errors


# --- nftables ----------------------------------------------------------------------------------

OUR_CHAIN_PREFIXES = ("KUBE-", "CNI-")


def parse_tables(nft_json: str) -> set[tuple[str, str]]:
    """(family, name) of every table in ``nft -j list tables|ruleset`` output."""
    return {
        (item["table"]["family"], item["table"]["name"])
        for item in json.loads(nft_json).get("nftables", [])
        if "table" in item
    }


def _jump_targets(expr: Any) -> Iterator[str]:
    """Chains a rule's expressions jump or go to (anywhere in the tree: verdict maps too)."""
    if isinstance(expr, dict):
        for key, value in expr.items():
            if key in ("jump", "goto") and isinstance(value, dict) and "target" in value:
                yield str(value["target"])
            else:
                yield from _jump_targets(value)
    elif isinstance(expr, list):
        for item in expr:
            yield from _jump_targets(item)


def _ours(chain: str) -> bool:
    return chain.startswith(OUR_CHAIN_PREFIXES)


def nft_cleanup_commands(ruleset_json: str, tables_before: set[tuple[str, str]]) -> list[list[str]]:
    """``nft`` argument lists that undo the node's nftables changes: delete the tables that did
    not exist before; in those that did, delete the rules that jump to KUBE-*/CNI-* chains, then
    flush and delete those chains (flushing all first: they jump to each other)."""
    items = json.loads(ruleset_json).get("nftables", [])
    tables_now = parse_tables(ruleset_json)
    new = sorted(tables_now - tables_before)
    cmds: list[list[str]] = [["delete", "table", fam, name] for fam, name in new]
    kept = tables_now & tables_before
    chains = sorted(
        (c["family"], c["table"], c["name"])
        for item in items
        if "chain" in item
        for c in [item["chain"]]
        if (c["family"], c["table"]) in kept and _ours(c["name"])
    )
    for item in items:
        r = item.get("rule")
        if not r or (r["family"], r["table"]) not in kept or _ours(r["chain"]):
            continue
        if any(_ours(t) for t in _jump_targets(r.get("expr", []))):
            cmds.append(
                ["delete", "rule", r["family"], r["table"], r["chain"], "handle", str(r["handle"])]
            )
    cmds += [["flush", "chain", *c] for c in chains]
    cmds += [["delete", "chain", *c] for c in chains]
    return cmds


def nft_ruleset() -> str:
    return _run(["nft", "-j", "list", "ruleset"])


def nft_tables() -> set[tuple[str, str]]:
    return parse_tables(_run(["nft", "-j", "list", "tables"]))


def restore_nft(tables_before: set[tuple[str, str]]) -> list[str]:
    """Run the cleanup commands one by one (as much as possible); return the failures."""
    errors: list[str] = []
    for cmd in nft_cleanup_commands(nft_ruleset(), tables_before):
        try:
            _run(["nft", *cmd])
        except HostsideError as err:
            errors.append(str(err))
    return errors


def nft_leftovers(ruleset_json: str, tables_before: set[tuple[str, str]]) -> list[str]:
    """What still differs: new tables, and KUBE-*/CNI-* chains anywhere."""
    out = [
        f"nft table {f} {n} was not there before"
        for f, n in sorted(parse_tables(ruleset_json) - tables_before)
    ]
    for item in json.loads(ruleset_json).get("nftables", []):
        c = item.get("chain")
        if c and (c["family"], c["table"]) in tables_before and _ours(c["name"]):
            out.append(f"nft chain {c['family']} {c['table']} {c['name']} left")
    return out


# --- nfacct (netfilter accounting counters, through netlink) -----------------------------------
# kube-proxy's iptables proxier makes "ct_state_invalid_dropped_pkts" and
# "localhost_nps_accepted_pkts" (pkg/proxy/metrics, v1.37); there is no nfacct binary here.

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ACCT = 7
NFNL_MSG_ACCT_NEW = 0
NFNL_MSG_ACCT_GET = 1
# 2 is GET_CTRZERO (read and reset), not delete: include/uapi/linux/netfilter/nfnetlink_acct.h
NFNL_MSG_ACCT_DEL = 3
NFACCT_NAME = 1
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLMSG_DONE = 3

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLATTR = struct.Struct("=HH")  # len, type


def _align4(n: int) -> int:
    return (n + 3) & ~3


def encode_nfacct(msg: int, flags: int, seq: int, name: str | None = None) -> bytes:
    """One nfnetlink acct request: nlmsghdr, nfgenmsg (AF_UNSPEC, version 0, res_id 0), and
    an NFACCT_NAME attribute (NUL-terminated) when ``name`` is given."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    if name is not None:
        data = name.encode() + b"\0"
        attr = _NLATTR.pack(_NLATTR.size + len(data), NFACCT_NAME) + data
        body += attr + b"\0" * (_align4(len(attr)) - len(attr))
    mtype = (NFNL_SUBSYS_ACCT << 8) | msg
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), mtype, flags, seq, 0) + body


@dataclass(frozen=True)
class NetlinkMessage:
    type: int
    flags: int
    seq: int
    payload: bytes


def decode_messages(data: bytes) -> list[NetlinkMessage]:
    """Split a netlink datagram into its messages."""
    out: list[NetlinkMessage] = []
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, flags, seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            raise HostsideError(f"malformed netlink message (length {length} at {off})")
        out.append(NetlinkMessage(mtype, flags, seq, data[off + _NLMSGHDR.size : off + length]))
        off += _align4(length)
    return out


def decode_attrs(data: bytes) -> dict[int, bytes]:
    """Netlink attributes (type without the nested/byte-order flags) to their payloads."""
    attrs: dict[int, bytes] = {}
    off = 0
    while off + _NLATTR.size <= len(data):
        length, atype = _NLATTR.unpack_from(data, off)
        if length < _NLATTR.size:
            break
        attrs[atype & 0x3FFF] = data[off + _NLATTR.size : off + length]
        off += _align4(length)
    return attrs


def netlink_error(msg: NetlinkMessage) -> int:
    """The errno of an NLMSG_ERROR message (0: an acknowledgement)."""
    (err,) = struct.unpack_from("=i", msg.payload)
    return -int(err)


def nfacct_name(msg: NetlinkMessage) -> str | None:
    """The counter name in one dump reply (after the 4-byte nfgenmsg)."""
    raw = decode_attrs(msg.payload[4:]).get(NFACCT_NAME)
    return None if raw is None else raw.split(b"\0", 1)[0].decode()


def _nfacct_request(msg: int, flags: int, name: str | None = None) -> list[NetlinkMessage]:
    """Send one request; collect replies until DONE (dump) or the ACK/error."""
    seq = int(time.monotonic_ns() & 0x7FFFFFFF)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(encode_nfacct(msg, flags, seq, name))
        replies: list[NetlinkMessage] = []
        while True:
            for m in decode_messages(sock.recv(65536)):
                if m.seq != seq:
                    continue
                if m.type == NLMSG_DONE:
                    return replies
                if m.type == NLMSG_ERROR:
                    err = netlink_error(m)
                    if err:
                        raise OSError(err, f"nfacct {name or ''}: {os.strerror(err)}")
                    return replies
                replies.append(m)


def list_nfacct() -> set[str]:
    """Names of every nfacct counter (``nfacct list``)."""
    replies = _nfacct_request(NFNL_MSG_ACCT_GET, NLM_F_REQUEST | NLM_F_DUMP)
    return {n for m in replies if (n := nfacct_name(m)) is not None}


def create_nfacct(name: str) -> None:
    """Create a counter (tests; kube-proxy makes its own)."""
    _nfacct_request(NFNL_MSG_ACCT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK, name)


def delete_nfacct(name: str) -> None:
    """Delete a counter (EBUSY while an iptables rule uses it: delete the rules first)."""
    _nfacct_request(NFNL_MSG_ACCT_DEL, NLM_F_REQUEST | NLM_F_ACK, name)


# --- host paths --------------------------------------------------------------------------------

# Written by the node outside the dirs the test bed gives it (the kubelet's device-plugins
# socket, pod logs, CNI results, kube-controller-manager's flex-volume dir).
HOST_PATHS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/log/pods"),
    Path("/var/lib/cni"),
    Path("/usr/libexec/kubernetes"),
    Path("/etc/kubernetes"),
    Path("/run/netns"),
)


def list_tree(top: Path) -> frozenset[str] | None:
    """Every path below ``top``, relative (None: ``top`` does not exist). Does not follow
    symlinks nor descend into mount points (a pod's volumes)."""
    if not top.is_dir() or top.is_symlink():
        return None if not os.path.lexists(top) else frozenset()
    dev = top.stat().st_dev
    found: set[str] = set()
    for root, dirs, files in os.walk(top):
        here = Path(root)
        for d in list(dirs):
            p = here / d
            found.add(str(p.relative_to(top)))
            if p.is_symlink() or p.stat().st_dev != dev:
                dirs.remove(d)
        found.update(str((here / f).relative_to(top)) for f in files)
    return frozenset(found)


def new_entries(before: frozenset[str], now: frozenset[str]) -> list[str]:
    """The topmost paths in ``now`` not in ``before`` (removing those removes all that is new)."""
    out: list[str] = []
    for rel in sorted(now - before):
        if not any(rel.startswith(top + "/") for top in out):
            out.append(rel)
    return out


def _removal_root(path: Path) -> Path:
    """The topmost missing component of a path that did not exist (what its creator made)."""
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _remove(path: Path) -> list[str]:
    still = unmount_under(path)
    if still:
        return [f"{path}: still mounted after umount -l: {still}"]
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    except OSError as err:
        return [f"could not remove {path}: {err}"]
    return []


@dataclass(frozen=True)
class PathState:
    """One watched path: where a missing one's tree would start, and what a present one held."""

    path: Path
    entries: frozenset[str] | None  # None: did not exist
    removal_root: Path

    @classmethod
    def capture(cls, path: Path) -> PathState:
        return cls(path, list_tree(path), _removal_root(path))

    def leftovers(self) -> list[Path]:
        if self.entries is None:
            return [self.removal_root] if os.path.lexists(self.removal_root) else []
        now = list_tree(self.path)
        return [self.path / rel for rel in new_entries(self.entries, now or frozenset())]

    def restore(self) -> list[str]:
        errors: list[str] = []
        for p in self.leftovers():
            errors += _remove(p)
        return errors


# --- the snapshot ------------------------------------------------------------------------------


def _interfaces() -> list[str]:
    return sorted(p.name for p in Path("/sys/class/net").iterdir())


@dataclass
class HostSnapshot:
    """The host as it was before a node ran; ``restore()`` puts it back."""

    bridge: str
    cgroup_root: str
    tunables: dict[str, str | None]
    nft_tables: set[tuple[str, str]]
    nfacct: set[str]
    paths: list[PathState]

    @classmethod
    def capture(
        cls, bridge: str, cgroup_root: str, *, paths: Sequence[Path] = HOST_PATHS
    ) -> HostSnapshot:
        """Record the state before the node starts (the bridge and cgroup root may already exist:
        they are the test bed's own and go in any case)."""
        _rel(cgroup_root)
        return cls(
            bridge=bridge,
            cgroup_root=cgroup_root,
            tunables=read_tunables(tunable_paths(_interfaces(), exclude=bridge)),
            nft_tables=nft_tables(),
            nfacct=list_nfacct(),
            paths=[PathState.capture(p) for p in paths],
        )

    def save(self, path: Path) -> None:
        """Keep the snapshot where a later run finds it if this one dies before ``restore()``
        (a SIGKILLed test process: its node's processes die with it, the host changes stay)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(pickle.dumps(self))
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> HostSnapshot | None:
        """The snapshot a run that died left at ``path``, if any."""
        try:
            snapshot = pickle.loads(path.read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            return None
        return snapshot if isinstance(snapshot, HostSnapshot) else None

    def restore(self) -> list[str]:
        """Undo everything, each step whatever the others did; return every error. Order: the
        processes in the cgroup root, nft rules (they use the counters), counters, bridge, paths,
        sysctls last (deleting the bridge takes its own with it)."""
        return _each(
            ("cgroup root", lambda: remove_cgroup_root(self.cgroup_root)),
            ("nftables", lambda: restore_nft(self.nft_tables)),
            ("nfacct", self._restore_nfacct),
            ("bridge", self._delete_bridge),
            ("paths", lambda: [e for s in self.paths for e in s.restore()]),
            ("sysctls", lambda: restore_tunables(self.tunables)),
        )

    def leftovers(self) -> list[str]:
        """What still differs from the capture (empty: the machine is as found)."""
        return _each(
            ("bridge", lambda: [f"bridge {self.bridge} exists"] * bridge_exists(self.bridge)),
            (
                "cgroup root",
                lambda: [f"cgroup {p} exists" for p in cgroup_root_leftovers(self.cgroup_root)],
            ),
            ("nftables", lambda: nft_leftovers(nft_ruleset(), self.nft_tables)),
            ("nfacct", lambda: [f"nfacct counter {n} is new" for n in sorted(self._new_nfacct())]),
            ("paths", lambda: [f"{p} is new" for s in self.paths for p in s.leftovers()]),
            ("sysctls", self._changed_tunables),
        )

    def _delete_bridge(self) -> list[str]:
        delete_bridge(self.bridge)
        return []

    def _new_nfacct(self) -> set[str]:
        return list_nfacct() - self.nfacct

    def _restore_nfacct(self) -> list[str]:
        errors: list[str] = []
        for name in sorted(self._new_nfacct()):
            try:
                delete_nfacct(name)
            except OSError as err:
                errors.append(f"could not delete nfacct counter {name}: {err}")
        return errors

    def _changed_tunables(self) -> list[str]:
        now = read_tunables(self.tunables)
        return [
            f"{p} is {now[p]}, was {v}" for p, v in changed_tunables(self.tunables, now).items()
        ]


def _each(*steps: tuple[str, Callable[[], list[str]]]) -> list[str]:
    """Run every step and concatenate what they return; a step that raises adds its error and
    the others still run (a restore must do as much as it can)."""
    out: list[str] = []
    for what, step in steps:
        try:
            out += step()
        except Exception as err:  # go on with the other steps
            out.append(f"{what}: {type(err).__name__}: {err}")
    return out
