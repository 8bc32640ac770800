"""The VXLAN overlay end to end: a real host, two real runners, real containers reaching each other by
overlay address across VXLAN, in hub and in mesh mode.

One machine, one Docker engine, yet every overlay packet between the two runners crosses VXLAN:

- the host daemon runs in its own network namespace ``H`` (``ip netns exec H kr host``), which holds the
  underlay switch (the bridge ``ul0``, no address), the host's own port on it (the veth ``ul-host``,
  198.18.N.2, the host's ``HOST_REACHABLE_ADDRESS``: a machine's NIC plugged into the switch, as the runners'
  are) and the host's overlay links;
- each runner runs in the machine's namespace (where Docker is) with its VXLAN endpoint in a namespace of its
  own, ``U0``/``U1`` (198.18.N.11/.12, ``OVERLAY_UNDERLAY_NETNS`` and ``OVERLAY_UNDERLAY_ADDRESS``): its
  VXLAN link is created there and moved next to its bridge, keeping its UDP socket on that address;
- the machine's namespace reaches ``H`` over a veth into ``ul0`` (198.18.N.1: the runners' URLs, the CLI's
  way to the host).

The runners' bridges share the machine's namespace, but each runner's containers route through the runner's
own table (``overlay_network``), so traffic to the other runner leaves through VXLAN: via the host in hub
mode (its links' counters show it), directly to the other runner's underlay address in mesh mode (the test
stops the host and takes its links down, and traffic still flows).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kohakuriver_runner.overlay_network import OverlayNetwork
from tests.integration.test_vm_network import namespaces, ns_ip, run, server
from tests.need import need_program, need_root

from .cluster import KR, Cluster, Daemon, free_port, wait_until
from .forwarding import Forward, docker_exec

pytestmark = [pytest.mark.slow, pytest.mark.docker]

SUBNET = "10.160.0.0/12/6/14"
SERVER_PORT = 7000
#: A task that serves a page with busybox httpd on every address of its container, then waits.
SERVER_TASK = (
    f"mkdir -p /tmp/w && echo from-server > /tmp/w/index.html && exec httpd -f -p {SERVER_PORT} -h /tmp/w"
)


@dataclass
class RunnerSide:
    name: str
    network: str  # OVERLAY_NETWORK_NAME
    bridge: str
    vxlan: str
    underlay_ns: str
    underlay: str


@dataclass
class OverlayCluster:
    cluster: Cluster
    host_ns: str
    runners: list[RunnerSide]
    mode: str

    def status(self) -> dict:
        return self.cluster.api("GET", "/api/overlay")

    def subnet_of(self, index: int) -> ipaddress.IPv4Network:
        name = self.runners[index].name
        entry = next(r for r in self.status()["runners"] if r["hostname"] == name)
        return ipaddress.IPv4Network(entry["subnet"])

    def host_link(self, index: int) -> str:
        name = self.runners[index].name
        return next(r["link"] for r in self.status()["runners"] if r["hostname"] == name)

    def host_overlay_address(self) -> str:
        return self.status()["host_overlay_address"].split("/")[0]

    def link_bytes(self, link: str) -> int:
        data = json.loads(run("ip", "-n", self.host_ns, "-j", "-s", "link", "show", "dev", link).stdout)[0]
        return int(data["stats64"]["rx"]["bytes"]) + int(data["stats64"]["tx"]["bytes"])

    def submit(self, index: int, *argv: str, token: str | None = None) -> str:
        extra = ["--ip-token", token] if token else []
        out = self.cluster.kr(
            "task", "submit", "-t", self.runners[index].name, "-c", "0", *extra, "--", *argv
        ).stdout.split()
        assert len(out) == 1, out
        self.cluster.wait_status(out[0], "running")
        return out[0]


def _append_config(path: Path, settings: dict[str, object]) -> None:
    # Later assignments win: the file is executed as Python.
    with path.open("a") as f:
        f.write("".join(f"{key} = {value!r}\n" for key, value in settings.items()))


def _underlay_port(host_ns: str, ns: str, port: str, address: str) -> None:
    ns_ip(host_ns, "link", "add", port, "type", "veth", "peer", "name", "ul0", "netns", ns)
    ns_ip(host_ns, "link", "set", port, "master", "ul0", "up")
    ns_ip(ns, "addr", "add", f"{address}/24", "dev", "ul0")
    ns_ip(ns, "link", "set", "ul0", "up")


def _overlay_up(side: RunnerSide) -> bool:
    done = subprocess.run(["docker", "network", "inspect", side.network], capture_output=True)
    return done.returncode == 0


@contextlib.contextmanager
def overlay_cluster(
    root: Path, mode: str, *, host_on_bridge: bool = False, **runner: object
) -> Iterator[OverlayCluster]:
    """A host in its own namespace and two runners with their own underlay addresses (module docstring),
    the overlay in ``mode`` (``runner``: more settings for both runners); everything made here is removed at
    the end. ``host_on_bridge`` puts the host's underlay address on the switch (the bridge) itself instead
    of on a port of it: a bridge has no encapsulation offloads, so everything the host sends through VXLAN
    is segmented and checksummed in software there (``bench/overlay.py --host-on-bridge`` shows the cost)."""
    need_root("the overlay end-to-end test (network namespaces, VXLAN, iptables)")
    for program in ("ip", "iptables", "docker"):
        need_program(program)
    tag = secrets.token_hex(2)
    net = f"198.18.{secrets.randbelow(250) + 1}"
    host_ns = f"kre2e-{tag}-h"
    sides = [
        RunnerSide(
            name="",
            network=f"kr-e2e-{tag}-ov{i}",
            bridge=f"kro{tag}b{i}",
            vxlan=f"kro{tag}v{i}",
            underlay_ns=f"kre2e-{tag}-u{i}",
            underlay=f"{net}.{11 + i}",
        )
        for i in range(2)
    ]
    root_port = f"kru{tag}"
    overlay = {"OVERLAY_ENABLED": True, "OVERLAY_SUBNET": SUBNET, "OVERLAY_MODE": mode}
    with namespaces(host_ns, *(s.underlay_ns for s in sides)):
        ns_ip(host_ns, "link", "add", "ul0", "type", "bridge")
        ns_ip(host_ns, "link", "set", "ul0", "up")
        if host_on_bridge:
            ns_ip(host_ns, "addr", "add", f"{net}.2/24", "dev", "ul0")
        else:
            ns_ip(host_ns, "link", "add", "ul-host", "type", "veth", "peer", "name", "ul-hport")
            ns_ip(host_ns, "link", "set", "ul-hport", "master", "ul0", "up")
            ns_ip(host_ns, "addr", "add", f"{net}.2/24", "dev", "ul-host")
            ns_ip(host_ns, "link", "set", "ul-host", "up")
        run("ip", "link", "add", root_port, "type", "veth", "peer", "name", "ul-root", "netns", host_ns)
        ns_ip(host_ns, "link", "set", "ul-root", "master", "ul0", "up")
        run("ip", "addr", "add", f"{net}.1/24", "dev", root_port)
        run("ip", "link", "set", root_port, "up")
        for i, side in enumerate(sides):
            _underlay_port(host_ns, side.underlay_ns, f"ul-r{i}", side.underlay)

        cluster = Cluster(root)
        _append_config(
            cluster.host_config,
            {"HOST_BIND_IP": f"{net}.2", "HOST_REACHABLE_ADDRESS": f"{net}.2", **overlay},
        )
        cluster.url = f"http://{net}.2:{cluster.host_port}"
        cluster.env["KOHAKURIVER_HOST"] = cluster.url
        cluster.host = Daemon(
            "host",
            ["ip", "netns", "exec", host_ns, KR, "host", "--config", str(cluster.host_config)],
            cluster.env,
            root / "host.log",
        )
        try:
            cluster.start_host()
            for i, side in enumerate(sides):
                port = free_port()
                side.name = cluster.add_runner(
                    i,
                    RUNNER_PORT=port,
                    RUNNER_URL=f"http://{net}.1:{port}",
                    HOST_ADDRESS=f"{net}.2",
                    OVERLAY_NETWORK_NAME=side.network,
                    OVERLAY_BRIDGE_NAME=side.bridge,
                    OVERLAY_VXLAN_NAME=side.vxlan,
                    OVERLAY_UNDERLAY_NETNS=side.underlay_ns,
                    OVERLAY_UNDERLAY_ADDRESS=side.underlay,
                    **overlay,
                    **runner,
                )
            for side in sides:
                wait_until(
                    lambda side=side: _overlay_up(side),
                    30,
                    lambda side=side: f"the overlay of {side.name}\n{cluster.runners[side.name].log()}",
                )
            yield OverlayCluster(cluster, host_ns, sides, mode)
        finally:
            try:
                cluster.stop()
            finally:
                for side in sides:
                    subprocess.run(["docker", "network", "rm", side.network], capture_output=True)
                    OverlayNetwork(side.bridge, side.vxlan).teardown()
                run("ip", "link", "del", root_port, check=False)


def _fetch(task_id: str, address: str) -> str:
    """The page of the server at ``address``, fetched from inside task ``task_id``'s container (with nc:
    this busybox's wget crashes)."""
    script = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {address} {SERVER_PORT}"
    return docker_exec(task_id, "sh", "-c", script, timeout=30)


def _reaches(task_id: str, address: str, timeout: float = 30) -> None:
    # Text mode: the answer's CRLFs arrive as newlines.
    wait_until(lambda: _fetch(task_id, address).endswith("\n\nfrom-server\n"), timeout,
               f"task {task_id} to fetch the page at {address}")  # fmt: skip


def _reaches_host(oc: OverlayCluster, task_id: str, own_address: str) -> None:
    """The task reaches the host's own overlay address, which sees the task's overlay address (no NAT)."""
    address = oc.host_overlay_address()
    with server(oc.host_ns, address, 7100):
        wait_until(
            lambda: docker_exec(task_id, "nc", "-w", "5", address, "7100", timeout=30).strip() == own_address,
            30,
            f"task {task_id} to reach the host's overlay address {address}",
        )


def _start_pair(oc: OverlayCluster) -> tuple[str, str, str, str]:
    """A server task on runner 1 and a client task on runner 0 with a reserved address: (client, its
    address, server, its address)."""
    server_task = oc.submit(1, "sh", "-c", SERVER_TASK)
    server_ip = oc.cluster.task(server_task)["overlay_ip"]
    assert ipaddress.IPv4Address(server_ip) in oc.subnet_of(1)

    subnet = oc.subnet_of(0)
    wanted = str(subnet.network_address + subnet.num_addresses // 2 + 7)  # the half Docker never picks from
    reserve = oc.cluster.kr("overlay", "reserve", "-n", oc.runners[0].name, "--ip", wanted)
    token = reserve.stdout.strip()
    client_task = oc.submit(0, "sleep", "3600", token=token)
    assert oc.cluster.task(client_task)["overlay_ip"] == wanted
    inspect = subprocess.run(
        ["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", f"kohakuriver-task-{client_task}"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    networks = json.loads(inspect.stdout)
    assert list(networks) == [oc.runners[0].network]
    assert networks[oc.runners[0].network]["IPAddress"] == wanted
    return client_task, wanted, server_task, server_ip


def test_hub(tmp_path, test_image) -> None:
    with overlay_cluster(tmp_path, "hub") as oc:
        client, client_ip, server_task, server_ip = _start_pair(oc)
        links = [oc.host_link(0), oc.host_link(1)]
        before = [oc.link_bytes(link) for link in links]
        _reaches(client, server_ip)
        # Both of the host's links carried it: runner 0 -> host -> runner 1.
        after = [oc.link_bytes(link) for link in links]
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
        _reaches_host(oc, client, client_ip)
        # The server's tunnel client reached its runner through the overlay gateway: kr forward works.
        with (
            Forward(oc.cluster, server_task, SERVER_PORT) as fwd,
            urllib.request.urlopen(f"http://127.0.0.1:{fwd.port}/", timeout=20) as page,
        ):
            assert page.read() == b"from-server\n"
        # The other way: a server on runner 0 at the address Docker gave it, fetched from runner 1.
        back = oc.submit(0, "sh", "-c", SERVER_TASK)
        _reaches(server_task, oc.cluster.task(back)["overlay_ip"])


def test_mesh(tmp_path, test_image) -> None:
    with overlay_cluster(tmp_path, "mesh") as oc:
        client, client_ip, _server_task, server_ip = _start_pair(oc)
        _reaches(client, server_ip)
        _reaches_host(oc, client, client_ip)
        links = [oc.host_link(0), oc.host_link(1)]
        # No host any more: the daemon stopped, its links down. Runner to runner still flows, directly.
        oc.cluster.host.stop()
        for link in [*links, "kohaku-host"]:
            ns_ip(oc.host_ns, "link", "set", link, "down")
        before = [oc.link_bytes(link) for link in links]
        _reaches(client, server_ip, timeout=15)
        assert [oc.link_bytes(link) for link in links] == before
