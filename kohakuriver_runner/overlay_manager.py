"""The runner's overlay from the host's answer to a network tasks join: ``OverlayManager``.

The host assigns the overlay at registration (``RegisterAnswer.overlay``); the manager then

1. makes the links (``overlay_network.OverlayNetwork.ensure``, in a thread): bridge, VXLAN, routes, rules;
2. makes the Docker network ``OVERLAY_NETWORK_NAME`` on that bridge: the runner's subnet and gateway, the
   host's address (subnet + 254) as an auxiliary address the engine never gives out, the driver's MTU,
   no masquerading by Docker (the runner's own rule translates only traffic leaving the overlay), and an
   ``IPRange`` of the lower half of the subnet for containers that ask for no address. The upper half is
   left to fixed addresses (reservations, VMs): the engine accepts a fixed address anywhere in the subnet,
   so a reserved address never collides with one the engine picked on its own. A network that differs
   (another runner id, MTU, bridge) is made again when no container uses it; otherwise the log says why it
   cannot be changed and tasks stay on ``DOCKER_NETWORK_NAME`` until it can.
3. gives ``placement()`` to the executor: tasks and Docker VPS join the overlay network while both are up.

``overlay_error`` in the answer (a settings mismatch, no free runner id) is logged as an error and the runner
runs without the overlay; links already made stay (containers on them keep their addresses). In mesh mode
``update_peers`` applies the peer list the heartbeat answers carry. Nothing is torn down when the runner
stops (running containers keep their network, as they keep running); ``disable`` removes it all when a
runner starts with ``OVERLAY_ENABLED`` off and finds the links of an earlier start.

Logs are said once per change, not once per retry: the Docker network is tried again at every Docker check
until it works.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import attrs
import trio

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import (
    OverlayAssignment,
    OverlayMode,
    OverlayPeer,
    OverlaySettingsView,
    RegisterAnswer,
)

from .container_spec import OverlayPlacement
from .docker_api import Conflict, DockerClient, DockerError, NetworkInfo, NotFound
from .overlay_network import OverlayLayout, OverlayNetwork, OverlayNetworkError, layout_from
from .runner_settings import RunnerSettings

__all__ = [
    "BRIDGE_OPTION",
    "HOST_AUX_NAME",
    "MTU_OPTION",
    "OverlayManager",
    "docker_auto_range",
    "docker_network_differences",
]

log = logging.getLogger("kohakuriver.runner.overlay")

BRIDGE_OPTION = "com.docker.network.bridge.name"
MTU_OPTION = "com.docker.network.driver.mtu"
MASQUERADE_OPTION = "com.docker.network.bridge.enable_ip_masquerade"
ICC_OPTION = "com.docker.network.bridge.enable_icc"
HOST_AUX_NAME = "kohakuriver-host"
NETWORK_LABEL = "kohakuriver.network"


def docker_auto_range(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    """Where Docker picks addresses for containers that ask for none: the lower half of ``subnet``."""
    return next(subnet.subnets(prefixlen_diff=1))


@attrs.frozen
class _WantedNetwork:
    subnet: str
    gateway: str
    ip_range: str
    aux: dict[str, str]
    options: dict[str, str]


def _wanted(layout: OverlayLayout, bridge: str) -> _WantedNetwork:
    return _WantedNetwork(
        subnet=str(layout.subnet),
        gateway=str(layout.gateway),
        ip_range=str(docker_auto_range(layout.subnet)),
        aux={HOST_AUX_NAME: str(layout.host_address)},
        options={
            BRIDGE_OPTION: bridge,
            MTU_OPTION: str(layout.mtu),
            MASQUERADE_OPTION: "false",
            ICC_OPTION: "true",
        },
    )


def docker_network_differences(info: NetworkInfo, layout: OverlayLayout, bridge: str) -> list[str]:
    """How the existing Docker network ``info`` differs from what ``layout`` needs (empty: it fits)."""
    wanted = _wanted(layout, bridge)
    have_options = {key: info.options.get(key) for key in wanted.options}
    pairs = [
        ("driver", info.driver, "bridge"),
        ("subnet", info.subnet, wanted.subnet),
        ("gateway", info.gateway, wanted.gateway),
        ("address range", info.ip_range, wanted.ip_range),
        ("auxiliary addresses", dict(info.aux_addresses), wanted.aux),
        ("options", have_options, wanted.options),
    ]
    return [f"{what} {have} (wanted {want})" for what, have, want in pairs if have != want]


class OverlayManager:
    """The overlay's state on this runner; every method is called from the trio loop."""

    def __init__(
        self,
        config: RunnerSettings,
        docker: DockerClient,
        *,
        network: OverlayNetwork | None = None,
        hostname: str = "",
    ) -> None:
        self.config = config
        self.docker = docker
        self.hostname = hostname or config.hostname
        self.network = network or OverlayNetwork(
            config.OVERLAY_BRIDGE_NAME,
            config.OVERLAY_VXLAN_NAME,
            underlay_netns=config.OVERLAY_UNDERLAY_NETNS or None,
        )
        #: This runner's VXLAN endpoint (``resolve_underlay``); None: unknown, the overlay cannot start.
        self.underlay_address: str | None = None
        self.assignment: OverlayAssignment | None = None
        self.layout: OverlayLayout | None = None
        self.links_ready = False
        self.docker_ready = False
        #: Why the overlay is not usable now (None while it is).
        self.problem: str | None = (
            "not registered with the host yet" if config.OVERLAY_ENABLED else "OVERLAY_ENABLED is off"
        )
        self._lock = trio.Lock()
        self._said: str | None = None

    # -- what the runner tells the host

    def settings_view(self) -> OverlaySettingsView:
        return OverlaySettingsView.from_config(self.config)

    async def resolve_underlay(self, runner_url: str) -> str | None:
        """Find this runner's VXLAN endpoint once (OVERLAY_UNDERLAY_ADDRESS or the runner URL's host)."""
        if not self.config.OVERLAY_ENABLED:
            return None
        try:
            self.underlay_address = await trio.to_thread.run_sync(
                self.config.overlay_underlay_address, runner_url
            )
        except ValueError as exc:
            self._fail(f"no underlay address for the overlay: {exc}")
            return None
        log.info("overlay: this runner's VXLAN endpoint is %s", self.underlay_address)
        return self.underlay_address

    # -- what the executor asks

    def placement(self) -> OverlayPlacement | None:
        """The overlay network for a new container, or None while the overlay is not fully up."""
        layout = self.layout
        if layout is None or not (self.links_ready and self.docker_ready):
            return None
        return OverlayPlacement(
            network=self.config.OVERLAY_NETWORK_NAME,
            subnet=layout.subnet,
            gateway=layout.gateway,
            reserved=frozenset({layout.host_address}),
            bridge=self.network.bridge,
            mtu=layout.mtu,
        )

    # -- the host's answers

    async def apply(self, answer: RegisterAnswer) -> None:
        """Act on the registration answer: make the overlay of ``answer.overlay``, or run without it."""
        if not self.config.OVERLAY_ENABLED:
            if answer.overlay is not None:
                log.warning("overlay: the host sent an assignment, but OVERLAY_ENABLED is off here: ignored")
            return
        if answer.overlay_error:
            self._fail(f"the host refused this runner's overlay: {answer.overlay_error}", drop=True)
            return
        if answer.overlay is None:
            self._fail("the host sent no overlay assignment (is OVERLAY_ENABLED on at the host?)", drop=True)
            return
        if self.underlay_address is None:
            self._fail(self.problem or "this runner's underlay address is unknown", drop=True)
            return
        try:
            layout = layout_from(
                answer.overlay,
                self.config.overlay_subnet,
                vxlan_id=self.config.OVERLAY_VXLAN_ID,
                local=self.underlay_address,
            )
        except (ValueError, ValidationError) as exc:
            self._fail(f"the host's overlay assignment does not fit this runner: {exc}", drop=True)
            return
        async with self._lock:
            try:
                await trio.to_thread.run_sync(self.network.ensure, layout)
            except OverlayNetworkError as exc:
                self._fail(f"cannot set up the overlay links: {exc}", drop=True)
                return
            changed = self.layout != layout
            self.assignment, self.layout, self.links_ready = answer.overlay, layout, True
            if changed:
                self.docker_ready = False
                log.info(
                    "overlay: runner id %s, subnet %s, gateway %s, %s mode, VNI %s, host %s",
                    layout.runner_id,
                    layout.subnet,
                    layout.gateway,
                    layout.mode.value,
                    layout.vni,
                    layout.host_underlay,
                )
            await self._ensure_docker_network_locked()

    async def update_peers(self, peers: list[OverlayPeer]) -> None:
        """Mesh mode: a new peer list from a heartbeat answer (forwarding entries, neighbours, routes)."""
        assignment, layout = self.assignment, self.layout
        if assignment is None or layout is None or assignment.mode is not OverlayMode.MESH:
            return
        others = [p for p in peers if p.runner_id != assignment.runner_id]
        try:
            updated = attrs.evolve(assignment, peers=others)
            new_layout = layout_from(
                updated, self.config.overlay_subnet, vxlan_id=self.config.OVERLAY_VXLAN_ID, local=layout.local
            )
        except (ValueError, ValidationError) as exc:
            log.warning("overlay: ignoring a peer list the host sent: %s", exc)
            return
        if new_layout.peers == layout.peers:
            return
        async with self._lock:
            try:
                await trio.to_thread.run_sync(self.network.sync_peers, new_layout)
            except OverlayNetworkError as exc:
                log.error("overlay: cannot apply the new peer list: %s", exc)
                return
            self.assignment, self.layout = updated, new_layout
        log.info(
            "overlay: peers now %s",
            ", ".join(f"{p.hostname} ({p.underlay_address})" for p in others) or "none",
        )

    # -- Docker

    async def ensure_docker_network(self) -> None:
        """Make the overlay's Docker network if the links are up and it is not there yet (the daemon calls
        this whenever Docker is reachable: after an outage of the engine the network is checked again)."""
        if self.layout is None or not self.links_ready or self.docker_ready:
            return
        async with self._lock:
            await self._ensure_docker_network_locked()

    def docker_lost(self) -> None:
        """The engine went away: check the network again when it is back."""
        self.docker_ready = False

    async def _ensure_docker_network_locked(self) -> None:
        layout = self.layout
        if layout is None or self.docker_ready:
            return
        name = self.config.OVERLAY_NETWORK_NAME
        bridge = self.network.bridge
        try:
            try:
                info: NetworkInfo | None = await self.docker.inspect_network(name)
            except NotFound:
                info = None
            if info is not None:
                differences = docker_network_differences(info, layout, bridge)
                if not differences:
                    self._ready(f"Docker network {name} on {bridge} ({layout.subnet})")
                    return
                if info.containers:
                    self._fail(
                        f"the Docker network {name} has {'; '.join(differences)}, and {len(info.containers)} "
                        f"container(s) use it, so it cannot be changed now: new tasks run on "
                        f"{self.config.DOCKER_NETWORK_NAME} until they have ended"
                    )
                    return
                log.info("overlay: making the Docker network %s again: %s", name, "; ".join(differences))
                await self.docker.remove_network(name)
                # The engine deletes a bridge it made itself: make sure ours is (still) there.
                await trio.to_thread.run_sync(self.network.ensure, layout)
            wanted = _wanted(layout, bridge)
            await self.docker.create_network(
                name,
                wanted.subnet,
                wanted.gateway,
                ip_range=wanted.ip_range,
                aux_addresses=wanted.aux,
                labels={NETWORK_LABEL: "overlay", "kohakuriver.runner": self.hostname},
                options=wanted.options,
            )
        except Conflict as exc:
            self._fail(f"cannot make the Docker network {name}: {exc}")
            return
        except DockerError as exc:
            self._fail(f"cannot set up the Docker network {name}: {exc}")
            return
        except OverlayNetworkError as exc:
            self.links_ready = False
            self._fail(f"cannot set up the overlay links: {exc}")
            return
        log.info("overlay: created the Docker network %s on %s (%s)", name, bridge, layout.subnet)
        self._ready(f"Docker network {name} on {bridge} ({layout.subnet})")

    # -- turning it off

    async def disable(self) -> None:
        """OVERLAY_ENABLED is off: remove an earlier start's overlay (the Docker network when no container
        uses it, then the links). Nothing is touched while containers still use the network."""
        name = self.config.OVERLAY_NETWORK_NAME
        try:
            present = await trio.to_thread.run_sync(self.network.present)
        except OverlayNetworkError as exc:
            log.warning("overlay: cannot look for an earlier overlay: %s", exc)
            return
        if not present:
            return
        try:
            info = await self.docker.inspect_network(name)
        except NotFound:
            info = None
        except DockerError as exc:
            log.warning("overlay: OVERLAY_ENABLED is off; cannot check the Docker network %s: %s", name, exc)
            return
        if info is not None:
            if info.containers:
                log.warning(
                    "overlay: OVERLAY_ENABLED is off, but %s container(s) still use the Docker network %s: "
                    "the overlay stays until they have ended and the runner starts again",
                    len(info.containers),
                    name,
                )
                return
            try:
                await self.docker.remove_network(name)
            except DockerError as exc:
                log.warning("overlay: cannot remove the Docker network %s: %s", name, exc)
                return
        try:
            await trio.to_thread.run_sync(self.network.teardown)
        except OverlayNetworkError as exc:
            log.warning("overlay: cannot remove the overlay links: %s", exc)
            return
        log.info("overlay: OVERLAY_ENABLED is off: removed the overlay of an earlier start")

    # -- state and its log lines

    def _fail(self, problem: str, *, drop: bool = False) -> None:
        if drop:
            self.layout = self.assignment = None
            self.links_ready = self.docker_ready = False
        self.problem = problem
        if self._said != problem:
            log.error(
                "overlay: %s; tasks run without the overlay (on %s)", problem, self.config.DOCKER_NETWORK_NAME
            )
            self._said = problem

    def _ready(self, what: str) -> None:
        self.docker_ready = True
        if self.problem is not None:
            log.info("overlay: up: %s", what)
        self.problem = None
        self._said = None

    def status(self) -> dict[str, Any]:
        """For logs and tests: what the overlay is doing."""
        layout = self.layout
        return {
            "enabled": self.config.OVERLAY_ENABLED,
            "up": self.placement() is not None,
            "problem": self.problem,
            "runner_id": None if layout is None else layout.runner_id,
            "subnet": None if layout is None else str(layout.subnet),
            "mode": None if layout is None else layout.mode.value,
            "peers": [] if layout is None else [p.runner_id for p in layout.peers],
        }
