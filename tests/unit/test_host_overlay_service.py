"""``overlay_service`` against a real store with a fake clock: the settings comparison at registration,
runner id allocation (lowest free, kept by hostname, out-of-plan ids dropped), the reservation key kept
across restarts, reservations expiring, and mesh peers resent only when needed.

The kernel side is ``OverlayLinks``'s (tested in network namespaces); here a recorder stands in for it so
that the service's own rules can be driven second by second."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import pytest

from kohakuriver_host.api_common import ApiProblem
from kohakuriver_host.auth import Principal
from kohakuriver_host.node_registry import NodeRegistry
from kohakuriver_host.overlay_links import Changes
from kohakuriver_host.overlay_service import OverlayService, check_settings, mismatch_reasons
from kohakuriver_host.store import WriteTx, open_store
from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.models import NodeRegistration
from kohakuriver_proto.models.overlay import OverlaySettingsView, ReserveRequest
from kohakuriver_proto.targets import Target
from tests.integration._host_harness import host_config


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@attrs.define
class RecordingLinks:
    """Stands in for ``OverlayLinks``: remembers what it was asked to make."""

    wanted: list[dict[int, str]] = attrs.field(factory=list)

    def reconcile(self, wanted: dict[int, str]) -> Changes:
        self.wanted.append(dict(wanted))
        return Changes()

    def states(self) -> dict[str, Any]:
        return {}

    def present(self) -> bool:
        return False


VIEW = OverlaySettingsView(enabled=True, subnet="10.128.0.0/12/6/14", vxlan_id=100, vxlan_port=4789, mtu=1450)
ALICE = Principal(1, "alice", "user")


def make(tmp_path, clock: Clock, store, **overrides: Any) -> tuple[OverlayService, RecordingLinks]:
    settings = {"OVERLAY_ENABLED": True, "HOST_REACHABLE_ADDRESS": "192.0.2.1", **overrides}
    links = RecordingLinks()
    service = OverlayService(
        host_config(tmp_path, **settings), store, NodeRegistry(), links=links, clock=clock
    )
    return service, links


async def allocate(service: OverlayService, hostname: str, underlay: str) -> int:
    row = await service.store.write(service.allocate_tx, hostname, underlay, service.clock())
    await service.registered(hostname, row, None)
    return row.runner_id


def registration(overlay: OverlaySettingsView | None) -> NodeRegistration:
    return NodeRegistration(
        hostname="r1", url="http://192.0.2.11:8001", total_cores=1, memory_total_bytes=1, overlay=overlay
    )


def test_mismatch_reasons() -> None:
    assert mismatch_reasons(VIEW, VIEW) == []
    assert mismatch_reasons(VIEW, None) == [
        "OVERLAY_ENABLED: host True, runner False (it sent no overlay settings)"
    ]
    off = attrs.evolve(VIEW, enabled=False)
    assert mismatch_reasons(off, None) == []
    assert mismatch_reasons(off, attrs.evolve(off, mtu=1400)) == []  # both off: the rest does not matter
    assert mismatch_reasons(off, VIEW) == ["OVERLAY_ENABLED: host False, runner True"]
    with pytest.raises(ApiProblem) as caught:
        check_settings(VIEW, registration(attrs.evolve(VIEW, vxlan_id=200, mtu=1400)))
    problem = caught.value
    assert problem.status == 409 and problem.field == "overlay"
    assert "OVERLAY_VXLAN_ID: host 100, runner 200" in problem.message
    assert "OVERLAY_MTU: host 1450, runner 1400" in problem.message
    check_settings(VIEW, registration(VIEW))


async def test_lowest_free_id_kept_by_hostname(tmp_path) -> None:
    clock = Clock()
    async with open_store(tmp_path / "host.db", clock=clock) as store:
        service, links = make(tmp_path, clock, store)
        await service.start()
        assert [await allocate(service, h, f"192.0.2.{i}") for i, h in enumerate("abc", 11)] == [1, 2, 3]
        assert links.wanted[-1] == {1: "192.0.2.11", 2: "192.0.2.12", 3: "192.0.2.13"}
        await store.write(WriteTx.delete_overlay_runner, "b")
        await service.node_removed("b", None)
        assert links.wanted[-1] == {1: "192.0.2.11", 3: "192.0.2.13"}
        assert await allocate(service, "d", "192.0.2.14") == 2  # the hole first
        assert await allocate(service, "a", "192.0.2.99") == 1  # moved: same id
        assert links.wanted[-1] == {1: "192.0.2.99", 2: "192.0.2.14", 3: "192.0.2.13"}
        # The host's own address: the runner shares its namespace, no link to it.
        assert await allocate(service, "local", "192.0.2.1") == 4
        assert 4 not in links.wanted[-1]


async def test_ids_outside_the_plan_are_dropped_at_start(tmp_path) -> None:
    clock = Clock()
    async with open_store(tmp_path / "host.db", clock=clock) as store:
        await store.write(WriteTx.put_overlay_runner, 2, "kept", "192.0.2.12")
        await store.write(WriteTx.put_overlay_runner, 9, "dropped", "192.0.2.19")
        service, links = make(tmp_path, clock, store, OVERLAY_SUBNET="10.128.0.0/12/2/18")  # ids 1..3
        await service.start()
        assert links.wanted == [{2: "192.0.2.12"}]
        assert [r.hostname for r in await store.read(lambda tx: tx.overlay_runners())] == ["kept"]
        assert await allocate(service, "new", "192.0.2.20") == 1
        assert await allocate(service, "newer", "192.0.2.21") == 3
        row = await store.write(service.allocate_tx, "full", "192.0.2.22", clock())
        assert row is None
        outcome = await service.registered("full", None, None)
        assert outcome.assignment is None and "every overlay runner id is taken" in outcome.error


async def test_reservations_expire_and_the_key_survives_a_restart(tmp_path) -> None:
    clock = Clock()
    async with open_store(tmp_path / "host.db", clock=clock) as store:
        await store.write(WriteTx.create_user, "alice", "user")
        service, _ = make(tmp_path, clock, store)
        await service.start()
        await allocate(service, "r1", "192.0.2.11")
        reservation = await service.reserve(ALICE, ReserveRequest(node="r1", ttl_seconds=60))
        assert reservation.ip == "10.128.127.254"
        assert reservation.expires_at == dt.datetime.fromtimestamp(clock.now + 60, dt.UTC)

        # A restarted host (a new service on the same store) still knows its tokens.
        restarted, _ = make(tmp_path, clock, store)
        await restarted.start()
        clock.now += 59
        claim, node = restarted.claim_for(reservation.token, None)
        assert (claim.ip, node) == ("10.128.127.254", "r1")
        with pytest.raises(ApiProblem, match="target r1"):
            restarted.claim_for(reservation.token, Target("r2"))
        assert [r.ip for r in (await restarted.status(ALICE)).reservations] == ["10.128.127.254"]

        clock.now += 1  # valid while now < expires_at
        with pytest.raises(ValidationError, match="expired token") as caught:
            restarted.claim_for(reservation.token, None)
        assert caught.value.field == "ip_token"
        assert (await restarted.status(ALICE)).reservations == []
        with pytest.raises(ApiProblem, match="released, expired or never made"):
            await restarted.release(ALICE, reservation.token)
        again = await restarted.reserve(ALICE, ReserveRequest(node="r1"))
        assert again.ip == reservation.ip and again.token != reservation.token

        # A key of another host: the same claim does not verify.
        other_home = tmp_path / "other"
        other_home.mkdir()
        async with open_store(other_home / "host.db", clock=clock) as other_store:
            other, _ = make(other_home, clock, other_store)
            await other.start()
            with pytest.raises(ValidationError, match="forged"):
                other.claim_for(again.token, None)


async def test_mesh_peers_are_resent_only_when_they_may_be_stale(tmp_path) -> None:
    clock = Clock()
    async with open_store(tmp_path / "host.db", clock=clock) as store:
        service, _ = make(tmp_path, clock, store, OVERLAY_MODE="mesh")
        await service.start()
        await allocate(service, "r1", "192.0.2.11")
        assert service.heartbeat_peers("r1") is None  # the registration answer carried the (empty) list
        await allocate(service, "r2", "192.0.2.12")
        assert service.heartbeat_peers("r1") == [
            {"runner_id": 2, "hostname": "r2", "underlay_address": "192.0.2.12"}
        ]
        assert service.heartbeat_peers("r1") is None
        assert service.heartbeat_peers("r2") is None
        clock.now += 60  # an answer may have been lost: sent again now and then
        assert service.heartbeat_peers("r2") == [
            {"runner_id": 1, "hostname": "r1", "underlay_address": "192.0.2.11"}
        ]
        assert service.heartbeat_peers("unknown") is None

        hub, _ = make(tmp_path, clock, store)
        await hub.start()
        assert hub.heartbeat_peers("r1") is None
