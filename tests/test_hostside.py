"""testbed.hostside: the pure parts always; the real bridge, cgroups, sysctls, nftables and
nfacct as root (each test leaves the machine as it found it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import hostside as hs
from tests.conftest import _unavailable

BRIDGE = "fzhs0"
OTHER = "fzhs1"
CGROUP = "/fzhs-test"


# --- netlink (pure) ----------------------------------------------------------------------------


def test_encode_nfacct_delete_matches_the_kernel_layout() -> None:
    msg = hs.encode_nfacct(hs.NFNL_MSG_ACCT_DEL, hs.NLM_F_REQUEST | hs.NLM_F_ACK, 7, "abc")
    length, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, mtype, flags, seq, pid) == (len(msg), 0x0703, 5, 7, 0)
    assert msg[16:20] == bytes([socket.AF_UNSPEC, 0, 0, 0])  # nfgenmsg
    assert msg[20:] == struct.pack("=HH", 8, hs.NFACCT_NAME) + b"abc\0"
    assert len(msg) % 4 == 0


def test_encode_pads_the_name_attribute_to_four_bytes() -> None:
    msg = hs.encode_nfacct(hs.NFNL_MSG_ACCT_NEW, hs.NLM_F_REQUEST, 1, "ab")
    assert msg[20:] == struct.pack("=HH", 7, 1) + b"ab\0" + b"\0"
    assert struct.unpack_from("=I", msg)[0] == len(msg) == 28


def test_encode_dump_has_no_attributes() -> None:
    msg = hs.encode_nfacct(hs.NFNL_MSG_ACCT_GET, hs.NLM_F_REQUEST | hs.NLM_F_DUMP, 3)
    assert len(msg) == 20 and struct.unpack_from("=HH", msg, 4) == (0x0701, 0x301)


def _reply(seq: int, name: str) -> bytes:
    """A dump reply as the kernel sends it: name, packets and bytes attributes."""
    data = name.encode() + b"\0"
    attrs = struct.pack("=HH", 4 + len(data), 1) + data
    attrs += b"\0" * (-len(attrs) % 4)
    attrs += struct.pack("=HH", 12, 2 | 0x4000) + b"\0" * 8  # NLA_F_NET_BYTEORDER packets
    body = b"\0\0\0\0" + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x0700, hs.NLM_F_MULTI, seq, 0) + body


def test_decode_a_dump_datagram() -> None:
    done = struct.pack("=IHHII", 20, hs.NLMSG_DONE, hs.NLM_F_MULTI, 9, 0) + b"\0" * 4
    msgs = hs.decode_messages(_reply(9, "ct_state_invalid_dropped_pkts") + _reply(9, "x") + done)
    assert [m.type for m in msgs] == [0x0700, 0x0700, hs.NLMSG_DONE]
    assert [hs.nfacct_name(m) for m in msgs[:2]] == ["ct_state_invalid_dropped_pkts", "x"]
    assert hs.decode_attrs(msgs[1].payload[4:])[2] == b"\0" * 8


def test_decode_error_and_ack() -> None:
    err = struct.pack("=IHHII", 36, hs.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -16) + b"\0" * 16
    ack = struct.pack("=IHHII", 36, hs.NLMSG_ERROR, 0x100, 2, 0) + b"\0" * 20
    assert [hs.netlink_error(m) for m in hs.decode_messages(err + ack)] == [16, 0]


def test_decode_rejects_a_truncated_message() -> None:
    with pytest.raises(hs.HostsideError, match="malformed"):
        hs.decode_messages(struct.pack("=IHHII", 40, 0x0700, 0, 1, 0))


# --- nft JSON (pure) ---------------------------------------------------------------------------


def _ruleset(*items: dict[str, object]) -> str:
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}}, *items]})


def _table(fam: str, name: str) -> dict[str, object]:
    return {"table": {"family": fam, "name": name, "handle": 1}}


def _chain(fam: str, table: str, name: str) -> dict[str, object]:
    return {"chain": {"family": fam, "table": table, "name": name, "handle": 2}}


def _rule(fam: str, table: str, chain: str, handle: int, *expr: object) -> dict[str, object]:
    return {
        "rule": {
            "family": fam,
            "table": table,
            "chain": chain,
            "handle": handle,
            "expr": list(expr),
        }
    }


RULESET = _ruleset(
    _table("ip", "nat"),
    _table("ip6", "nat"),
    _table("ip", "filter"),
    _chain("ip", "nat", "PREROUTING"),
    _chain("ip", "nat", "CNI-HOSTPORT-DNAT"),
    _chain("ip", "nat", "KUBE-SERVICES"),
    _chain("ip", "nat", "MINE"),
    _rule(
        "ip", "nat", "PREROUTING", 5, {"counter": None}, {"jump": {"target": "CNI-HOSTPORT-DNAT"}}
    ),
    _rule("ip", "nat", "PREROUTING", 6, {"goto": {"target": "KUBE-SERVICES"}}),
    _rule("ip", "nat", "PREROUTING", 7, {"jump": {"target": "MINE"}}),
    _rule("ip", "nat", "PREROUTING", 8, {"accept": None}),
    _rule("ip", "nat", "CNI-HOSTPORT-DNAT", 9, {"jump": {"target": "KUBE-SERVICES"}}),
    _rule(
        "ip", "nat", "MINE", 10, {"vmap": {"data": {"set": [[1, {"jump": {"target": "KUBE-X"}}]]}}}
    ),
)


def test_parse_tables() -> None:
    assert hs.parse_tables(RULESET) == {("ip", "nat"), ("ip6", "nat"), ("ip", "filter")}
    assert hs.parse_tables(_ruleset()) == set()


def test_cleanup_deletes_new_tables_and_our_chains_in_old_ones() -> None:
    cmds = hs.nft_cleanup_commands(RULESET, {("ip", "nat"), ("inet", "gone")})
    assert cmds == [
        ["delete", "table", "ip", "filter"],
        ["delete", "table", "ip6", "nat"],
        ["delete", "rule", "ip", "nat", "PREROUTING", "handle", "5"],
        ["delete", "rule", "ip", "nat", "PREROUTING", "handle", "6"],
        ["delete", "rule", "ip", "nat", "MINE", "handle", "10"],
        ["flush", "chain", "ip", "nat", "CNI-HOSTPORT-DNAT"],
        ["flush", "chain", "ip", "nat", "KUBE-SERVICES"],
        ["delete", "chain", "ip", "nat", "CNI-HOSTPORT-DNAT"],
        ["delete", "chain", "ip", "nat", "KUBE-SERVICES"],
    ]


def test_cleanup_of_an_unchanged_ruleset_is_empty() -> None:
    plain = _ruleset(_table("ip", "nat"), _chain("ip", "nat", "MINE"))
    assert hs.nft_cleanup_commands(plain, {("ip", "nat")}) == []


def test_nft_leftovers_names_new_tables_and_our_chains() -> None:
    assert hs.nft_leftovers(RULESET, {("ip", "nat"), ("ip", "filter")}) == [
        "nft table ip6 nat was not there before",
        "nft chain ip nat CNI-HOSTPORT-DNAT left",
        "nft chain ip nat KUBE-SERVICES left",
    ]


# --- the rest of the pure parts ----------------------------------------------------------------


def test_is_our_bridge() -> None:
    link = {
        "ifname": "fz",
        "linkinfo": {"info_kind": "bridge"},
        "addr_info": [{"family": "inet", "local": "10.244.7.1", "prefixlen": 24}],
    }
    assert hs.is_our_bridge([link], "10.244.7.1/24")
    assert not hs.is_our_bridge([link], "10.244.7.1/16")
    assert not hs.is_our_bridge([{**link, "linkinfo": {"info_kind": "veth"}}], "10.244.7.1/24")
    assert not hs.is_our_bridge([{"ifname": "fz", "addr_info": []}], "10.244.7.1/24")


MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
29 30 0:26 / /proc rw - proc proc rw
"""


def test_cgroup_hierarchies_from_mountinfo() -> None:
    assert hs.cgroup_hierarchies(MOUNTINFO) == [
        Path("/sys/fs/cgroup/cpu,cpuacct"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/unified"),
    ]
    v2 = "26 25 0:23 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert hs.cgroup_hierarchies(v2) == [Path("/sys/fs/cgroup")]


@pytest.mark.parametrize("bad", ["", "/", "/a/../b"])
def test_bad_cgroup_root(bad: str) -> None:
    with pytest.raises(hs.HostsideError, match="bad cgroup root"):
        hs.make_cgroup_root(bad)


def test_tunable_paths_put_globals_before_interfaces() -> None:
    paths = hs.tunable_paths(["eth0", "all", "fzhs0", "eth0.5"], exclude="fzhs0")
    assert paths[0] == "/proc/sys/vm/overcommit_memory"
    assert paths.index("/proc/sys/net/ipv4/ip_forward") < paths.index(
        "/proc/sys/net/ipv4/conf/eth0/forwarding"
    )
    assert "/proc/sys/net/ipv4/conf/eth0.5/route_localnet" in paths
    assert not any("fzhs0" in p for p in paths)
    assert sum("/conf/all/" in p for p in paths) == 3  # the globals only


def test_changed_tunables_skips_files_that_came_or_went() -> None:
    before = {"a": "0", "b": "1", "c": None, "d": "5"}
    assert hs.changed_tunables(before, {"a": "1", "b": "1", "c": "3", "d": None}) == {"a": "0"}


def test_new_entries_are_the_topmost_new_paths() -> None:
    before = frozenset({"device-plugins", "x"})
    now = before | {"device-plugins/kubelet.sock", "pods", "pods/a", "pods/a/b", "podsx"}
    assert hs.new_entries(before, now) == ["device-plugins/kubelet.sock", "pods", "podsx"]


def test_paths_restore_removes_only_what_is_new(tmp_path: Path) -> None:
    existing = tmp_path / "kubelet"
    (existing / "device-plugins").mkdir(parents=True)
    (existing / "keep").write_text("host's")
    missing = tmp_path / "usr" / "libexec" / "kubernetes"
    states = [hs.PathState.capture(existing), hs.PathState.capture(missing)]
    assert states[0].entries == {"device-plugins", "keep"} and states[1].entries is None
    (existing / "device-plugins" / "kubelet.sock").write_text("")
    (existing / "pods" / "a").mkdir(parents=True)
    (missing / "kubelet-plugins" / "volume" / "exec").mkdir(parents=True)
    assert [p for s in states for p in s.leftovers()] == [
        existing / "device-plugins" / "kubelet.sock",
        existing / "pods",
        tmp_path / "usr",
    ]
    assert [e for s in states for e in s.restore()] == []
    assert sorted(os.listdir(existing)) == ["device-plugins", "keep"]
    assert os.listdir(existing / "device-plugins") == []
    assert not (tmp_path / "usr").exists()
    assert [p for s in states for p in s.leftovers()] == []


def test_each_runs_every_step_and_collects_failures() -> None:
    ran: list[str] = []

    def boom() -> list[str]:
        ran.append("boom")
        raise OSError("no")

    def fine() -> list[str]:
        ran.append("fine")
        return ["an error"]

    assert hs._each(("first", boom), ("second", fine)) == ["first: OSError: no", "an error"]
    assert ran == ["boom", "fine"]


# --- real (root) -------------------------------------------------------------------------------


@pytest.fixture
def real() -> Iterator[None]:
    """Root, ip and nft; afterwards nothing of ours is left, whatever the test did."""
    if os.geteuid() != 0:
        _unavailable("the host side (bridges, cgroups, nftables, nfacct) needs root")
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            _unavailable(f"no {tool} binary: apt-get install {pkg}")
    yield
    errors = hs.remove_cgroup_root(CGROUP)
    for br in (BRIDGE, OTHER):
        hs.delete_bridge(br)
    for fam, name in hs.nft_tables():
        if name.startswith("fzhs_"):
            subprocess.run(["nft", "delete", "table", fam, name], check=True)
    for name in hs.list_nfacct():
        if name.startswith("fzhs_"):
            hs.delete_nfacct(name)
    assert not [e for e in errors if "killed" not in e]


def test_bridge_create_reuse_and_delete(real: None) -> None:
    hs.create_bridge(BRIDGE, "10.244.250.1/24")
    assert hs.bridge_exists(BRIDGE)
    assert Path(f"/sys/class/net/{BRIDGE}/bridge").is_dir()
    hs.create_bridge(BRIDGE, "10.244.250.1/24")  # ours: reused
    with pytest.raises(hs.HostsideError, match=r"not a bridge with 10\.244\.251\.1/24"):
        hs.create_bridge(BRIDGE, "10.244.251.1/24")
    hs.delete_bridge(BRIDGE)
    hs.delete_bridge(BRIDGE)  # idempotent
    assert not hs.bridge_exists(BRIDGE)


def test_tunables_round_trip(real: None) -> None:
    hs.create_bridge(BRIDGE, "10.244.250.1/24")
    path = f"/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet"
    before = hs.read_tunables([path, "/proc/sys/no/such"])
    assert before == {path: "0", "/proc/sys/no/such": None}
    Path(path).write_text("1")
    assert hs.changed_tunables(before, hs.read_tunables(before)) == {path: "0"}
    assert hs.restore_tunables(before) == []
    assert hs.read_tunables([path]) == {path: "0"}


def test_nfacct_create_list_delete(real: None) -> None:
    hs.create_nfacct("fzhs_counter")
    assert "fzhs_counter" in hs.list_nfacct()
    hs.delete_nfacct("fzhs_counter")
    assert "fzhs_counter" not in hs.list_nfacct()
    with pytest.raises(FileNotFoundError):
        hs.delete_nfacct("fzhs_counter")


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True)


def test_nft_restore_deletes_new_tables_and_our_chains(real: None) -> None:
    _nft("table ip fzhs_pre {\n chain pre { type nat hook prerouting priority 0; accept; }\n}\n")
    before = hs.nft_tables()
    _nft(
        "add table ip fzhs_test\nadd chain ip fzhs_test KUBE-X\n"
        "add chain ip fzhs_pre KUBE-SERVICES\nadd chain ip fzhs_pre CNI-HOSTPORT-DNAT\n"
        "add chain ip fzhs_pre KUBE-SVC-X\n"
        "add rule ip fzhs_pre CNI-HOSTPORT-DNAT jump KUBE-SERVICES\n"
        "add rule ip fzhs_pre pre counter jump CNI-HOSTPORT-DNAT\n"
        "add rule ip fzhs_pre KUBE-SERVICES jump KUBE-SVC-X\n"
    )
    assert len(hs.nft_leftovers(hs.nft_ruleset(), before)) == 4
    assert hs.restore_nft(before) == []
    assert hs.nft_leftovers(hs.nft_ruleset(), before) == []
    ruleset = json.loads(hs.nft_ruleset())["nftables"]
    chains = [i["chain"]["name"] for i in ruleset if "chain" in i]
    rules = [i["rule"]["chain"] for i in ruleset if "rule" in i]
    assert ("ip", "fzhs_pre") in hs.nft_tables() and chains == ["pre"] and rules == ["pre"]


def test_cgroup_root_make_and_remove_kills_frozen_leftovers(real: None) -> None:
    hs.make_cgroup_root(CGROUP)
    dirs = [h / CGROUP.strip("/") for h in hs.cgroup_hierarchies()]
    assert all(d.is_dir() for d in dirs)
    cpuset = Path("/sys/fs/cgroup/cpuset") / CGROUP.strip("/")
    if cpuset.exists():
        assert (cpuset / "cpuset.cpus").read_text() == Path(
            "/sys/fs/cgroup/cpuset/cpuset.cpus"
        ).read_text()
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        for d in dirs:
            (d / "pod" / "c").mkdir(parents=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):
                for sub in (d / "pod", d / "pod" / "c"):
                    if (sub / knob).exists():
                        (sub / knob).write_text((d / knob).read_text())
            if d.parent.name != "unified":  # v2 takes no tasks in an inner node (pod/)
                (d / "pod" / "c" / "cgroup.procs").write_text(str(sleeper.pid))
        freezer = Path("/sys/fs/cgroup/freezer") / CGROUP.strip("/") / "pod" / "c"
        if freezer.exists():
            (freezer / "freezer.state").write_text("FROZEN")
        errors = hs.remove_cgroup_root(CGROUP)
        assert errors == [f"killed processes left in cgroup fzhs-test: [{sleeper.pid}]"]
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert hs.cgroup_root_leftovers(CGROUP) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
    assert hs.remove_cgroup_root(CGROUP) == []  # gone: nothing to do


def test_snapshot_restores_everything(real: None, tmp_path: Path) -> None:
    """Every kind of change at once; restore leaves nothing for leftovers() to report."""
    hs.create_bridge(OTHER, "10.244.252.1/24")  # a host interface the snapshot knows
    existing = tmp_path / "var-log"
    existing.mkdir()
    watched = tmp_path / "var" / "lib" / "cni"
    snap = hs.HostSnapshot.capture(BRIDGE, CGROUP, paths=[watched, existing])
    assert snap.leftovers() == []
    tunable = f"/proc/sys/net/ipv4/conf/{OTHER}/route_localnet"
    assert snap.tunables[tunable] == "0"

    hs.create_bridge(BRIDGE, "10.244.250.1/24")
    hs.make_cgroup_root(CGROUP)
    Path(tunable).write_text("1")
    _nft("add table ip fzhs_test\nadd chain ip fzhs_test CNI-HOSTPORT-SETMARK\n")
    hs.create_nfacct("fzhs_counter")
    (watched / "results").mkdir(parents=True)
    (existing / "pods").write_text("")
    mount = watched / "results" / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "fzhs", str(mount)], check=True)
    found = "\n".join(snap.leftovers())
    for what in (
        f"bridge {BRIDGE} exists",
        f"cgroup /sys/fs/cgroup/freezer{CGROUP} exists",
        f"{tunable} is 1, was 0",
        "nft table ip fzhs_test was not there before",
        "nfacct counter fzhs_counter is new",
        f"{tmp_path / 'var'} is new",
        f"{existing / 'pods'} is new",
    ):
        assert what in found

    t0 = time.monotonic()
    assert snap.restore() == []
    assert snap.leftovers() == []
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "var").exists() and os.listdir(existing) == []
    assert hs.read_tunables([tunable])[tunable] == "0"
