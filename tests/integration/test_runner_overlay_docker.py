"""``OverlayManager`` against the real Docker engine: the overlay's Docker network from the host's answer.

The links are a recording stand-in here (the kernel side is ``test_runner_overlay_network.py``, the whole
path ``tests/e2e/test_overlay.py``), so the engine makes the network's bridge itself under a name unique to
the test and deletes it with the network. Everything the test creates is removed at the end.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from contextlib import suppress

import pytest
import trio

from kohakuriver_proto.models import OverlayMode, OverlayPeer, OverlaySettingsView, RegisterAnswer
from kohakuriver_proto.overlay import build_assignment
from kohakuriver_runner.config import runner_config_from
from kohakuriver_runner.docker_api import ContainerSpec, DockerClient, NotFound
from kohakuriver_runner.overlay_manager import BRIDGE_OPTION, HOST_AUX_NAME, MTU_OPTION, OverlayManager
from tests.need import need

pytestmark = pytest.mark.docker

SOCKET = os.environ.get("KR_DOCKER_SOCKET", "/var/run/docker.sock")
BUSYBOX = "kohakuriver/busybox:latest"
SUBNET = "10.176.0.0/12/6/14"
TAG = secrets.token_hex(3)
LABEL = "org.kohakuriver.test"


class Links:
    """Stands in for ``OverlayNetwork``: records what the manager asked of the kernel."""

    def __init__(self, bridge: str) -> None:
        self.bridge = bridge
        self.calls: list[tuple[str, object]] = []
        self.present_answer = False

    def ensure(self, layout) -> None:
        self.calls.append(("ensure", layout))

    def sync_peers(self, layout) -> None:
        self.calls.append(("sync_peers", layout))

    def present(self) -> bool:
        return self.present_answer

    def teardown(self) -> None:
        self.calls.append(("teardown", None))


def answer(runner_id: int, mode: OverlayMode = OverlayMode.HUB, peers=()) -> RegisterAnswer:
    view = OverlaySettingsView(
        enabled=True, subnet=SUBNET, vxlan_id=100, vxlan_port=4789, mtu=1400, mode=mode
    )
    return RegisterAnswer(message="ok", overlay=build_assignment(view, runner_id, "192.0.2.1", list(peers)))


@pytest.fixture
async def rig():
    need(os.path.exists(SOCKET), f"no Docker socket at {SOCKET}")
    network = f"kr-test-{TAG}-overlay"
    config = runner_config_from(
        RUNNER_HOSTNAME=f"kr-test-{TAG}",
        OVERLAY_ENABLED=True,
        OVERLAY_SUBNET=SUBNET,
        OVERLAY_MTU=1400,
        OVERLAY_NETWORK_NAME=network,
        OVERLAY_UNDERLAY_ADDRESS="192.0.2.11",
    )
    async with DockerClient(SOCKET) as docker:
        links = Links(f"krt{TAG}")
        manager = OverlayManager(config, docker, network=links)  # type: ignore[arg-type]
        assert await manager.resolve_underlay("http://127.0.0.1:8001") == "192.0.2.11"
        try:
            yield manager, docker, links
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                for c in await docker.list_containers(labels={LABEL: TAG}):
                    await docker.remove(c.id, force=True)
                with suppress(NotFound):
                    await docker.remove_network(network)


async def test_network_made_from_the_assignment(rig) -> None:
    manager, docker, links = rig
    assert manager.placement() is None
    await manager.apply(answer(1))
    placement = manager.placement()
    assert placement is not None and manager.problem is None
    assert (placement.subnet, placement.gateway) == (
        ipaddress.IPv4Network("10.176.64.0/18"),
        ipaddress.IPv4Address("10.176.64.1"),
    )
    assert placement.reserved == {ipaddress.IPv4Address("10.176.64.254")}
    assert [name for name, _ in links.calls] == ["ensure"]

    info = await docker.inspect_network(manager.config.OVERLAY_NETWORK_NAME)
    assert (info.subnet, info.gateway, info.ip_range) == ("10.176.64.0/18", "10.176.64.1", "10.176.64.0/19")
    assert info.aux_addresses == {HOST_AUX_NAME: "10.176.64.254"}
    assert info.options[BRIDGE_OPTION] == links.bridge and info.options[MTU_OPTION] == "1400"
    assert info.labels["kohakuriver.runner"] == manager.hostname

    # The same answer again (a re-registration): nothing is made again.
    await manager.apply(answer(1))
    assert (await docker.inspect_network(info.name)).id == info.id

    # A container Docker gives an address picks it from the lower half; a fixed one may be anywhere.
    spec = ContainerSpec(
        name=f"kr-test-{TAG}-a",
        image=BUSYBOX,
        cmd=["sleep", "600"],
        labels={LABEL: TAG},
        network=info.name,
        ipv4_address="10.176.100.9",
    )
    fixed = await docker.create_container(spec)
    await docker.start(fixed)
    auto = await docker.create_container(
        ContainerSpec(
            name=f"kr-test-{TAG}-b",
            image=BUSYBOX,
            cmd=["sleep", "600"],
            labels={LABEL: TAG},
            network=info.name,
        )
    )
    await docker.start(auto)
    assert (await docker.inspect(fixed)).networks[info.name] == "10.176.100.9"
    assert ipaddress.IPv4Address((await docker.inspect(auto)).networks[info.name]) in ipaddress.IPv4Network(
        "10.176.64.0/19"
    )

    # Another runner id while containers use the network: refused, said, and no overlay for new tasks.
    await manager.apply(answer(2))
    assert manager.placement() is None
    assert "cannot be changed now" in (manager.problem or "")
    assert (await docker.inspect_network(info.name)).subnet == "10.176.64.0/18"
    # Once they are gone, the Docker check makes it again.
    for container in (fixed, auto):
        await docker.remove(container, force=True)
    await manager.ensure_docker_network()
    assert manager.placement() is not None and manager.placement().subnet == ipaddress.IPv4Network(
        "10.176.128.0/18"
    )
    remade = await docker.inspect_network(info.name)
    assert remade.id != info.id and remade.subnet == "10.176.128.0/18"


async def test_refusal_and_errors_leave_it_off(rig) -> None:
    manager, _docker, links = rig
    await manager.apply(RegisterAnswer(message="ok", overlay_error="OVERLAY_MTU: host 1450, runner 1400"))
    assert manager.placement() is None and "OVERLAY_MTU" in (manager.problem or "")
    await manager.apply(RegisterAnswer(message="ok"))
    assert manager.placement() is None and "no overlay assignment" in (manager.problem or "")
    assert links.calls == []


async def test_mesh_peers(rig) -> None:
    manager, _docker, links = rig
    peer2 = OverlayPeer(runner_id=2, hostname="b", underlay_address="192.0.2.12")
    await manager.apply(answer(1, OverlayMode.MESH, [peer2]))
    assert [p.runner_id for p in manager.layout.peers] == [2]
    await manager.update_peers([peer2])  # unchanged: nothing to do
    assert [name for name, _ in links.calls] == ["ensure"]
    peer3 = OverlayPeer(runner_id=3, hostname="c", underlay_address="192.0.2.13")
    self_entry = OverlayPeer(runner_id=1, hostname=manager.hostname, underlay_address="192.0.2.11")
    await manager.update_peers([peer2, peer3, self_entry])  # the runner itself is left out
    assert [name for name, _ in links.calls] == ["ensure", "sync_peers"]
    assert [p.runner_id for p in manager.layout.peers] == [2, 3]


async def test_disable_removes_an_earlier_overlay(rig) -> None:
    manager, docker, links = rig
    await manager.apply(answer(1))
    links.present_answer = True
    await manager.disable()
    with pytest.raises(NotFound):
        await docker.inspect_network(manager.config.OVERLAY_NETWORK_NAME)
    assert links.calls[-1] == ("teardown", None)
