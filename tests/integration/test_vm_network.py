"""The VM bridge, TAPs and NAT on a real kernel, always inside network namespaces the test makes and deletes
(never the machine's own namespace: no link, address or firewall rule of the machine is touched).

Namespaces: ``H`` plays the runner's machine (the bridge, the firewall); ``G`` a guest, attached to the
bridge by a veth where QEMU would use a TAP; ``O`` the outside world, reached from ``H`` over another veth in
TEST-NET-1 (192.0.2.0/24) and with no route back to the VM subnet, so a guest's connection reaches it only
masqueraded. No ping on these machines: the probes are small Python TCP programs run with ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest
import trio

from kohakuriver_runner.vm_network import TAP_PREFIX, VmBridge, VmNetworkError, bridge_mac, tap_name
from tests.need import need, need_program, need_root

BRIDGE = "kohaku-br0"
SUBNET = "10.200.0.0/24"
GATEWAY = "10.200.0.1"
GUEST = "10.200.0.2"

# Accepts connections until killed; answers each with the address it came from. Prints "ready" once bound.
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode() + b"\\n")
    c.close()
"""

# Connects (retrying while the link comes up, up to the deadline) and prints what the server said.
CLIENT = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[3])
while True:
    try:
        with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1) as c:
            print(c.makefile().readline().strip())
            break
    except OSError as exc:
        if time.monotonic() > deadline:
            print("failed:", exc)
            sys.exit(1)
        time.sleep(0.1)
"""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done


def ns_ip(ns: str, *argv: str) -> None:
    run("ip", "-n", ns, *argv)


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[None]:
    made: list[str] = []
    try:
        for name in names:
            done = run("ip", "netns", "add", name, check=False)
            need(done.returncode == 0, f"cannot create a network namespace: {done.stderr.strip()}")
            made.append(name)
            ns_ip(name, "link", "set", "lo", "up")
        yield
    finally:
        for name in made:
            run("ip", "netns", "del", name, check=False)


@pytest.fixture
def host_ns() -> Iterator[str]:
    need_root("the VM network test (network namespaces, iptables)")
    for program in ("ip", "iptables", "sysctl"):
        need_program(program)
    name = f"krtest-{secrets.token_hex(4)}"
    with namespaces(name):
        yield name


def rules(ns: str, table: str) -> list[str]:
    return run("ip", "netns", "exec", ns, "iptables", "-t", table, "-S").stdout.splitlines()


def link(ns: str, name: str) -> dict:
    return json.loads(run("ip", "-n", ns, "-j", "-d", "link", "show", name).stdout)[0]


def test_ensure_twice_makes_everything_once(host_ns: str) -> None:
    bridge = VmBridge(BRIDGE, SUBNET, GATEWAY, netns=host_ns)
    bridge.ensure()
    first = (rules(host_ns, "nat"), rules(host_ns, "filter"))
    bridge.ensure()
    assert (rules(host_ns, "nat"), rules(host_ns, "filter")) == first

    nat, filt = first
    assert nat.count(f"-A POSTROUTING -s {SUBNET} ! -o {BRIDGE} -j MASQUERADE") == 1
    assert filt.count(f"-A FORWARD -i {BRIDGE} -j ACCEPT") == 1
    assert filt.count(f"-A FORWARD -o {BRIDGE} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT") == 1

    info = link(host_ns, BRIDGE)
    assert info["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in info["flags"]
    assert info["address"] == bridge_mac(BRIDGE)
    addresses = json.loads(run("ip", "-n", host_ns, "-j", "-4", "addr", "show", BRIDGE).stdout)[0][
        "addr_info"
    ]
    assert [(a["local"], a["prefixlen"]) for a in addresses] == [(GATEWAY, 24)]
    forward = run("ip", "netns", "exec", host_ns, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip()
    assert forward == "1"


def test_ensure_repairs_what_is_missing(host_ns: str) -> None:
    bridge = VmBridge(BRIDGE, SUBNET, GATEWAY, netns=host_ns)
    bridge.ensure()
    masquerade = ["-s", SUBNET, "!", "-o", BRIDGE, "-j", "MASQUERADE"]
    run("ip", "netns", "exec", host_ns, "iptables", "-t", "nat", "-D", "POSTROUTING", *masquerade)
    ns_ip(host_ns, "link", "set", BRIDGE, "down")
    bridge.ensure()
    assert rules(host_ns, "nat").count(f"-A POSTROUTING -s {SUBNET} ! -o {BRIDGE} -j MASQUERADE") == 1
    assert "UP" in link(host_ns, BRIDGE)["flags"]


def test_a_link_of_another_kind_is_refused(host_ns: str) -> None:
    ns_ip(host_ns, "link", "add", BRIDGE, "type", "veth", "peer", "name", "vx1")
    with pytest.raises(VmNetworkError, match="not a bridge"):
        VmBridge(BRIDGE, SUBNET, GATEWAY, netns=host_ns).ensure()


def test_missing_namespace_is_an_error() -> None:
    need_root("the VM network test")
    bridge = VmBridge(BRIDGE, SUBNET, GATEWAY, netns=f"krtest-absent-{secrets.token_hex(4)}")
    with pytest.raises(VmNetworkError, match="does not exist"):
        bridge.ensure()


def test_taps(host_ns: str) -> None:
    bridge = VmBridge(BRIDGE, SUBNET, GATEWAY, netns=host_ns)
    tap = tap_name(7_300_123_456_789_012_345)
    with pytest.raises(VmNetworkError, match="does not exist"):
        bridge.add_tap(tap)  # before ensure: no bridge to attach it to
    bridge.ensure()
    # not a TAP of ours: never listed
    ns_ip(host_ns, "link", "add", "vx0", "type", "veth", "peer", "name", "vx1")

    bridge.add_tap(tap)
    bridge.add_tap(tap)  # idempotent
    bridge.add_tap(tap_name(1))
    assert bridge.taps() == sorted([tap, tap_name(1)])

    info = link(host_ns, tap)
    assert info["master"] == BRIDGE
    assert "UP" in info["flags"]
    assert info["linkinfo"]["info_kind"] == "tun"
    assert info["linkinfo"]["info_data"]["type"] == "tap"
    assert info["linkinfo"]["info_data"]["pi"] is False
    assert info["linkinfo"]["info_data"]["persist"] is True

    # Detached and down (e.g. by hand): add_tap puts it back.
    ns_ip(host_ns, "link", "set", tap, "nomaster", "down")
    bridge.add_tap(tap)
    info = link(host_ns, tap)
    assert info["master"] == BRIDGE and "UP" in info["flags"]

    bridge.remove_tap(tap)
    bridge.remove_tap(tap)  # absent is fine
    assert bridge.taps() == [tap_name(1)]
    with pytest.raises(VmNetworkError, match="not a TAP"):
        bridge.remove_tap("vx0")
    assert all(name.startswith(TAP_PREFIX) for name in bridge.taps())


async def test_from_a_worker_thread(host_ns: str) -> None:
    """How the runner calls it: from trio, through trio.to_thread."""
    bridge = VmBridge(BRIDGE, SUBNET, GATEWAY, netns=host_ns)
    await trio.to_thread.run_sync(bridge.ensure)
    await trio.to_thread.run_sync(bridge.add_tap, tap_name(42))
    assert await trio.to_thread.run_sync(bridge.taps) == [tap_name(42)]
    await trio.to_thread.run_sync(bridge.remove_tap, tap_name(42))
    assert await trio.to_thread.run_sync(bridge.taps) == []


@contextlib.contextmanager
def server(ns: str, address: str, port: int) -> Iterator[None]:
    process = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, address, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            process.kill()
            raise AssertionError(
                f"server in {ns} did not start: {process.stderr.read() if process.stderr else ''}"
            )
        yield
    finally:
        process.kill()
        process.wait(timeout=10)


def connect(ns: str, address: str, port: int, deadline: float) -> subprocess.CompletedProcess[str]:
    return run(
        "ip",
        "netns",
        "exec",
        ns,
        sys.executable,
        "-c",
        CLIENT,
        address,
        str(port),
        str(deadline),
        check=False,
    )


def test_guest_reaches_gateway_and_outside_through_nat(host_ns: str) -> None:
    guest, outside = f"{host_ns}-g", f"{host_ns}-o"
    with namespaces(guest, outside):
        # The machine's firewall as Docker leaves it: forwarding dropped unless a rule accepts it.
        run("ip", "netns", "exec", host_ns, "iptables", "-P", "FORWARD", "DROP")
        VmBridge(BRIDGE, SUBNET, GATEWAY, netns=host_ns).ensure()

        ns_ip(host_ns, "link", "add", "vg0", "type", "veth", "peer", "name", "eth0", "netns", guest)
        ns_ip(host_ns, "link", "set", "vg0", "master", BRIDGE, "up")
        ns_ip(guest, "addr", "add", f"{GUEST}/24", "dev", "eth0")
        ns_ip(guest, "link", "set", "eth0", "up")
        ns_ip(guest, "route", "add", "default", "via", GATEWAY)

        ns_ip(host_ns, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", outside)
        ns_ip(host_ns, "addr", "add", "192.0.2.1/24", "dev", "up0")
        ns_ip(host_ns, "link", "set", "up0", "up")
        ns_ip(outside, "addr", "add", "192.0.2.2/24", "dev", "eth0")
        ns_ip(outside, "link", "set", "eth0", "up")

        # The gateway: where the runner listens for the guests' agents.
        with server(host_ns, GATEWAY, 8001):
            done = connect(guest, GATEWAY, 8001, 10)
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.strip() == GUEST

        # The outside world, which has no route to the VM subnet: it sees the masqueraded address.
        with server(outside, "192.0.2.2", 8080):
            done = connect(guest, "192.0.2.2", 8080, 10)
            assert done.returncode == 0, done.stdout + done.stderr
            assert done.stdout.strip() == "192.0.2.1"

        # Even with a route to the subnet, nothing outside opens a connection to a guest.
        ns_ip(outside, "route", "add", SUBNET, "via", "192.0.2.1")
        with server(guest, GUEST, 22):
            done = connect(outside, GUEST, 22, 1.5)
            assert done.returncode == 1, done.stdout
