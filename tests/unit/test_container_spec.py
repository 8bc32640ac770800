"""ExecuteRequest + runner settings -> ContainerSpec, field by field (pure: no Docker, no file system)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_proto.errors import ValidationError
from kohakuriver_proto.lifecycle import TaskType
from kohakuriver_proto.models import ExecuteRequest
from kohakuriver_runner.config import runner_config_from
from kohakuriver_runner.container_spec import (
    LABEL_RUNNER,
    LABEL_TASK_ID,
    LABEL_TASK_TYPE,
    TUNNEL_CLIENT_TARGET,
    TUNNEL_ENV_CONTAINER_ID,
    TUNNEL_ENV_TOKEN,
    TUNNEL_ENV_URL,
    NodeFacts,
    SpecError,
    TunnelInjection,
    build_container_spec,
    container_name,
    host_directories,
    task_id_from_labels,
    task_labels,
    tunnel_url,
    with_tunnel,
)
from kohakuriver_runner.docker_api import ContainerSpec, Mount

IMAGE = "kohakuriver/busybox:latest"
NANO = 1_000_000_000


def config(**overrides):
    values = {
        "RUNNER_HOSTNAME": "node1",
        "SHARED_DIR": "/mnt/share",
        "LOCAL_TEMP_DIR": "/scratch/kr",
        "DOCKER_NETWORK_NAME": "kr-net",
    }
    values.update(overrides)
    return runner_config_from(values)


FACTS = NodeFacts(cpu_count=8, numa_topology={0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}, gpu_count=4)


def request(**kwargs) -> ExecuteRequest:
    kwargs.setdefault("task_id", 123456789012345)
    kwargs.setdefault("command", "python")
    return ExecuteRequest(**kwargs)


def spec(req=None, cfg=None, facts=FACTS, image=IMAGE):
    return build_container_spec(req or request(), cfg or config(), facts, image)


# -- identity ----------------------------------------------------------------------------------------------


def test_name_labels_image_network_init():
    s = spec()
    assert s.name == "kohakuriver-task-123456789012345" == container_name(123456789012345)
    assert s.image == IMAGE
    assert s.labels == {LABEL_TASK_ID: "123456789012345", LABEL_RUNNER: "node1", LABEL_TASK_TYPE: "command"}
    assert s.network == "kr-net"
    assert s.init is True
    assert s.restart_policy is None
    assert s.to_api()["HostConfig"]["Init"] is True
    assert s.to_api()["HostConfig"]["NetworkMode"] == "kr-net"


def test_output_goes_to_the_local_log_driver_with_explicit_limits():
    # json-file would replace bytes that are not UTF-8; `local` keeps them. The limits are always given.
    assert spec().to_api()["HostConfig"]["LogConfig"] == {
        "Type": "local",
        "Config": {"max-size": "100m", "max-file": "10", "compress": "false"},
    }
    small = spec(cfg=config(TASK_LOG_MAX_SIZE_MB=5, TASK_LOG_MAX_FILES=2)).to_api()["HostConfig"]
    assert small["LogConfig"]["Config"] == {"max-size": "5m", "max-file": "2", "compress": "false"}
    assert "LogConfig" not in ContainerSpec(name="x", image=IMAGE).to_api()["HostConfig"]


def test_labels_round_trip_and_reject_garbage():
    labels = task_labels(42, "n", TaskType.VPS)
    assert labels[LABEL_TASK_TYPE] == "vps"
    assert task_id_from_labels(labels) == 42
    for bad in (
        {},
        {LABEL_TASK_ID: ""},
        {LABEL_TASK_ID: "-1"},
        {LABEL_TASK_ID: "12a"},
        {LABEL_TASK_ID: "9" * 20},
    ):
        assert task_id_from_labels(bad) is None


# -- command: an argv, never a shell string ------------------------------------------------------------------


def test_command_is_an_argv_with_the_entrypoint_cleared():
    s = spec(request(command="python", arguments=["-c", "print(1); import os", "$HOME", "a b"]))
    assert s.entrypoint == ()
    assert s.cmd == ("python", "-c", "print(1); import os", "$HOME", "a b")
    body = s.to_api()
    assert body["Entrypoint"] == [""]  # the engine's spelling of "no entrypoint"
    assert body["Cmd"] == ["python", "-c", "print(1); import os", "$HOME", "a b"]


@given(
    command=st.text(min_size=1, max_size=50).filter(lambda t: t.strip() and "\0" not in t),
    arguments=st.lists(st.text(max_size=30).filter(lambda t: "\0" not in t), max_size=6),
)
def test_any_command_reaches_docker_verbatim(command, arguments):
    s = spec(request(command=command, arguments=arguments))
    assert s.to_api()["Cmd"] == [command, *arguments]
    assert s.to_api()["Entrypoint"] == [""]


# -- environment, working directory, user ------------------------------------------------------------------


def test_environment_has_user_vars_and_kohakuriver_vars():
    s = spec(request(env_vars={"FOO": "bar baz", "EMPTY": "", "Q": "$(x);`y`"}))
    assert s.env == {
        "FOO": "bar baz",
        "EMPTY": "",
        "Q": "$(x);`y`",
        "KOHAKURIVER_TASK_ID": "123456789012345",
        "KOHAKURIVER_SHARED_DIR": "/shared",
        "KOHAKURIVER_LOCAL_TEMP_DIR": "/local_temp",
    }
    assert "KOHAKURIVER_TASK_ID=123456789012345" in s.to_api()["Env"]


def test_numa_node_is_announced_in_the_environment():
    assert spec(request(numa_node=1)).env["KOHAKURIVER_TARGET_NUMA_NODE"] == "1"


def test_working_dir_default_and_override():
    assert spec().working_dir == "/shared"
    assert spec(cfg=config(DEFAULT_WORKING_DIR="/work")).working_dir == "/work"
    assert spec(request(working_dir="/data/run")).working_dir == "/data/run"


def test_runner_user():
    assert spec().user is None
    assert "User" not in spec().to_api()
    assert spec(cfg=config(RUNNER_USER="1000:1000")).user == "1000:1000"


# -- privileges --------------------------------------------------------------------------------------------


def test_unprivileged_tasks_get_sys_nice_only():
    s = spec()
    assert s.privileged is False
    assert s.cap_add == ("SYS_NICE",)


@pytest.mark.parametrize(("runner_flag", "task_flag"), [(True, False), (False, True), (True, True)])
def test_privileged_by_runner_or_task(runner_flag, task_flag):
    s = spec(request(privileged=task_flag), config(TASKS_PRIVILEGED=runner_flag))
    assert s.privileged is True
    assert s.cap_add == ()
    assert s.to_api()["HostConfig"]["Privileged"] is True


# -- CPU, NUMA, memory, GPUs -------------------------------------------------------------------------------


def test_cores_become_a_cpu_quota_without_numa():
    s = spec(request(required_cores=3))
    assert s.nano_cpus == 3 * NANO
    assert s.cpuset_cpus is None and s.cpuset_mems is None
    assert s.to_api()["HostConfig"]["NanoCpus"] == 3 * NANO


def test_zero_cores_means_unlimited():
    s = spec(request(required_cores=0))
    assert s.nano_cpus is None
    assert "NanoCpus" not in s.to_api()["HostConfig"]


def test_more_cores_than_the_machine_has_is_all_of_them():
    assert spec(request(required_cores=64)).nano_cpus == 8 * NANO


def test_numa_node_pins_cpus_and_memory_and_keeps_the_quota():
    s = spec(request(numa_node=1, required_cores=2))
    assert s.cpuset_cpus == "4,5,6,7"
    assert s.cpuset_mems == "1"
    assert s.nano_cpus == 2 * NANO
    host = s.to_api()["HostConfig"]
    assert (host["CpusetCpus"], host["CpusetMems"]) == ("4,5,6,7", "1")


def test_numa_quota_is_capped_at_the_nodes_cores():
    assert spec(request(numa_node=0, required_cores=6)).nano_cpus == 4 * NANO
    pinned = spec(request(numa_node=0, required_cores=0))
    assert pinned.cpuset_cpus == "0,1,2,3" and pinned.nano_cpus is None


def test_unknown_numa_node_is_refused():
    with pytest.raises(SpecError, match="NUMA node 5 does not exist"):
        spec(request(numa_node=5))


def test_numa_without_a_known_topology_falls_back_to_the_quota():
    facts = NodeFacts(cpu_count=8, numa_topology=None)
    s = spec(request(numa_node=0, required_cores=2), facts=facts)
    assert s.cpuset_cpus is None and s.cpuset_mems is None
    assert s.nano_cpus == 2 * NANO


def test_memory_limit():
    assert spec().memory_bytes is None
    s = spec(request(required_memory_bytes=512 * 1024 * 1024))
    assert s.memory_bytes == 512 * 1024 * 1024
    host = s.to_api()["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 512 * 1024 * 1024


def test_gpus_become_a_device_request():
    s = spec(request(gpu_ids=[0, 2]))
    assert s.gpu_ids == ("0", "2")
    assert s.to_api()["HostConfig"]["DeviceRequests"] == [
        {"Driver": "nvidia", "DeviceIDs": ["0", "2"], "Capabilities": [["gpu"]]}
    ]


def test_no_gpu_request_without_gpus():
    s = spec(facts=NodeFacts(cpu_count=8))
    assert s.gpu_ids == ()
    assert "DeviceRequests" not in s.to_api()["HostConfig"]


def test_gpus_this_node_lacks_are_refused():
    with pytest.raises(SpecError, match="has no GPUs"):
        spec(request(gpu_ids=[0]), facts=NodeFacts(cpu_count=8))
    with pytest.raises(SpecError, match=r"GPUs \[4\] do not exist"):
        spec(request(gpu_ids=[1, 4]))


# -- mounts --------------------------------------------------------------------------------------------------


def test_mounts_with_shared_storage():
    facts = NodeFacts(cpu_count=8, shared_dir_available=True)
    s = spec(
        request(additional_mounts=["/datasets:/data:ro"]),
        config(ADDITIONAL_MOUNTS=["/opt/tools:/tools", "/models:/models:rw"]),
        facts,
    )
    assert s.mounts == (
        Mount("/mnt/share/shared_data", "/shared"),
        Mount("/scratch/kr", "/local_temp"),
        Mount("/opt/tools", "/tools"),
        Mount("/models", "/models"),
        Mount("/datasets", "/data", read_only=True),
    )
    assert host_directories(config(), facts) == ["/scratch/kr", "/mnt/share/shared_data"]


def test_no_shared_mount_without_shared_storage():
    s = spec(facts=NodeFacts(cpu_count=8, shared_dir_available=False))
    assert s.mounts == (Mount("/scratch/kr", "/local_temp"),)
    assert host_directories(config(), NodeFacts(cpu_count=8)) == ["/scratch/kr"]


def test_two_mounts_on_one_target_are_refused():
    with pytest.raises(SpecError, match="two mounts target /local_temp"):
        spec(request(additional_mounts=["/elsewhere:/local_temp"]))
    with pytest.raises(SpecError, match="two mounts target /x"):
        spec(request(additional_mounts=["/a:/x", "/b:/x/"]))


def test_a_config_mount_the_protocol_refuses_is_reported():
    with pytest.raises(SpecError, match=r"ADDITIONAL_MOUNTS\[0\]"):
        spec(cfg=config(ADDITIONAL_MOUNTS=["/a,b:/x"]))


# -- tunnel-client injection -------------------------------------------------------------------------------

TUNNEL = TunnelInjection(client_path="/opt/kr/tunnel-client", url="ws://172.30.0.1:8001", secret="ab" * 32)


def test_no_tunnel_unless_asked():
    s = spec()
    assert s.entrypoint == ()
    assert not any(m.target == TUNNEL_CLIENT_TARGET for m in s.mounts)
    assert TUNNEL_ENV_TOKEN not in s.env


def test_tunnel_client_wraps_the_command_with_exec_mode():
    s = build_container_spec(request(arguments=["-c", "print(1)"]), config(), FACTS, IMAGE, TUNNEL)
    assert s.entrypoint == (TUNNEL_CLIENT_TARGET, "--exec", "--")
    assert s.cmd == ("python", "-c", "print(1)")  # unchanged: exec mode runs it as the container's command
    assert Mount("/opt/kr/tunnel-client", TUNNEL_CLIENT_TARGET, read_only=True) in s.mounts
    assert s.env[TUNNEL_ENV_URL] == "ws://172.30.0.1:8001"
    assert s.env[TUNNEL_ENV_CONTAINER_ID] == s.name == container_name(123456789012345)
    assert s.env[TUNNEL_ENV_TOKEN] == "ab" * 32
    # Everything else is the spec without the tunnel.
    plain = spec()
    assert s.env.items() >= plain.env.items()
    assert s.labels == plain.labels and s.network == plain.network and s.init


def test_user_environment_cannot_override_the_tunnel_variables():
    # The request model already refuses KOHAKURIVER_* names; the spec does not rely on that.
    with pytest.raises(ValidationError, match="reserved"):
        request(env_vars={TUNNEL_ENV_TOKEN: "x"})
    env = {
        TUNNEL_ENV_URL: "ws://evil:1",
        TUNNEL_ENV_CONTAINER_ID: "kohakuriver-task-1",
        TUNNEL_ENV_TOKEN: "x",
    }
    base = ContainerSpec(name="kohakuriver-task-2", image=IMAGE, entrypoint=[], env={**env, "KEEP": "me"})
    s = with_tunnel(base, TUNNEL)
    assert s.env == {
        TUNNEL_ENV_URL: TUNNEL.url,
        TUNNEL_ENV_CONTAINER_ID: "kohakuriver-task-2",
        TUNNEL_ENV_TOKEN: TUNNEL.secret,
        "KEEP": "me",
    }


def test_with_tunnel_prefixes_an_explicit_entrypoint_and_refuses_the_images():
    base = ContainerSpec(name="kohakuriver-vps-7", image=IMAGE, entrypoint=["/init"], cmd=["sshd", "-D"])
    s = with_tunnel(base, TUNNEL)
    assert s.entrypoint == (TUNNEL_CLIENT_TARGET, "--exec", "--", "/init")
    assert s.cmd == ("sshd", "-D")
    assert s.env[TUNNEL_ENV_CONTAINER_ID] == "kohakuriver-vps-7"
    with pytest.raises(SpecError, match="explicit entrypoint"):
        with_tunnel(ContainerSpec(name="x", image=IMAGE), TUNNEL)


def test_a_user_mount_on_the_tunnel_client_path_is_refused():
    req = request(additional_mounts=["/tmp/fake:/usr/local/bin/tunnel-client"])
    with pytest.raises(SpecError, match="tunnel client"):
        build_container_spec(req, config(), FACTS, IMAGE, TUNNEL)


@pytest.mark.parametrize(
    ("overrides", "url"),
    [
        ({}, "ws://172.30.0.1:8001"),
        ({"RUNNER_PORT": 9001, "DOCKER_NETWORK_SUBNET": "10.9.0.0/24", "DOCKER_NETWORK_GATEWAY": "10.9.0.1"},
         "ws://10.9.0.1:9001"),
        ({"TLS_CERT_FILE": "/etc/kr/cert.pem", "TLS_KEY_FILE": "/etc/kr/key.pem"}, "wss://172.30.0.1:8001"),
    ],
)  # fmt: skip
def test_tunnel_url_is_the_network_gateway(overrides, url):
    assert tunnel_url(config(**overrides)) == url
