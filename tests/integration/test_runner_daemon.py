"""The daemon as a whole: two runners on one Docker engine, a runner without Docker, TLS, the log file."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from pathlib import Path

import httpx
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kohakuriver_runner.container_spec import container_name

from ._runner_harness import TOKEN, FakeHost, Runner, new_task_id, req, runner_config, runner_name, runner_rig


@pytest.fixture
async def rig(nursery, tmp_path):
    async with runner_rig(nursery, tmp_path) as r:
        yield r


@pytest.mark.docker
async def test_two_runners_share_docker_and_adopt_only_their_own(rig):
    config_a, config_b = rig.config("a"), rig.config("b")
    assert config_a.RUNNER_PORT != config_b.RUNNER_PORT
    a = await rig.start(config=config_a)
    b = await rig.start(config=config_b)
    ta, tb = new_task_id(), new_task_id()
    await a.execute(req(ta, "sleep", "300"))
    await b.execute(req(tb, "sh", "-c", "sleep 2; exit 4"))
    await rig.host.wait_status(ta, "running")
    await rig.host.wait_status(tb, "running")
    # A runner does not know the other's tasks.
    assert (await a.client.post(f"/api/kill/{tb}")).status_code == 404
    assert (await a.logs(tb)).status_code == 404

    await a.crash()
    await b.crash()
    with trio.fail_after(30):
        await rig.docker.wait(container_name(tb))
    # Only A comes back: it adopts its own task and leaves B's exited container alone.
    a2 = await rig.start(config=config_a)
    beat = await rig.host.wait_for(
        lambda: (hb := rig.host.last_heartbeat(config_a.RUNNER_HOSTNAME)) and ta in hb.running_tasks and hb
    )
    assert tb not in beat.running_tasks
    await trio.sleep(1.5)
    assert rig.host.final(tb) is None
    assert (await rig.docker.inspect(container_name(tb))).state.status == "exited"
    # B comes back and reports its own task's exit.
    b2 = await rig.start(config=config_b)
    final = await rig.host.wait_final(tb)
    assert (final.status.value, final.exit_code) == ("failed", 4)
    assert (await b2.logs(tb)).status_code == 200
    assert (await a2.client.post(f"/api/kill/{ta}")).status_code == 200
    assert (await rig.host.wait_final(ta, timeout=20)).status.value == "killed"


async def test_runner_without_docker_says_so_and_refuses_work(nursery, tmp_path):
    host = FakeHost()
    await nursery.start(host.serve)
    log_file = tmp_path / "logs" / "runner.log"
    config = runner_config(
        tmp_path,
        host,
        runner_name("nodocker"),
        DOCKER_SOCKET=str(tmp_path / "missing.sock"),
        RUNNER_LOG_FILE=str(log_file),
    )
    runner = Runner(config)
    await runner.start(nursery)
    try:
        reg = await host.wait_for(lambda: host.registrations)
        assert reg[0].docker_available is False
        assert "missing.sock" in (reg[0].docker_error or "")
        beat = await host.next_heartbeat(config.RUNNER_HOSTNAME)
        assert beat.docker_available is False
        assert "cannot reach Docker" in (beat.docker_error or "")
        resp = await runner.execute(req(new_task_id(), "echo", "hi"))
        assert resp.status_code == 503
        body = resp.json()
        assert body["error"] == "unavailable"
        assert "Docker is not available" in body["message"]
        info = (await runner.client.get("/api/info")).json()
        assert info["docker_available"] is False
    finally:
        await runner.crash()
    assert not host.errors
    # Said at start, in the log file too.
    assert "Docker is not usable" in log_file.read_text()


async def test_tls(nursery, tmp_path):
    cert, key = self_signed(tmp_path)
    host = FakeHost()
    await nursery.start(host.serve)
    config = runner_config(
        tmp_path,
        host,
        runner_name("tls"),
        TLS_CERT_FILE=str(cert),
        TLS_KEY_FILE=str(key),
        DOCKER_SOCKET=str(tmp_path / "missing.sock"),
    )
    runner = Runner(config)
    await runner.start(nursery)
    try:
        assert runner.handle.url.startswith("https://")
        assert runner.handle.bind_url.startswith("https://")
        reg = await host.wait_for(lambda: host.registrations)
        assert reg[0].url == runner.handle.url
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert))) as client:
            resp = await client.get(
                f"{runner.handle.url}/api/info", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert resp.status_code == 200
            assert resp.json()["hostname"] == config.RUNNER_HOSTNAME
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(runner.handle.url.replace("https://", "http://") + "/api/info")
    finally:
        await runner.crash()


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "runner.crt", directory / "runner.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path
