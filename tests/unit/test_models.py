"""Models and the converter: JSON round trips of every model, strictness, and errors that name the field."""

from __future__ import annotations

import base64
import datetime as dt
import json
import struct

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kohakuriver_proto import ValidationError
from kohakuriver_proto import converter as conv
from kohakuriver_proto.lifecycle import TaskStatus, TaskType
from kohakuriver_proto.models import (
    ApiError,
    CommandTaskSpec,
    GpuInfo,
    Heartbeat,
    Mount,
    NodeInfo,
    NodeRegistration,
    NodeStatus,
    NumaNode,
    SshKeyMode,
    StatusUpdate,
    TaskRecord,
    VpsBackend,
    VpsSpec,
    check_ssh_public_key,
    parse_mount,
)
from kohakuriver_proto.targets import Target, format_target

# -- strategies for valid values -----------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
one_line = st.text(
    st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\u2028\u2029"), max_size=40
)
non_blank = text.filter(lambda s: s.strip())
ids = st.integers(0, (1 << 63) - 1)
small = st.integers(0, 1 << 40)
metric = st.integers(-1, 1 << 20)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False)
temps = st.none() | st.floats(min_value=-50, max_value=150, allow_nan=False)
utc_offsets = st.builds(
    dt.timezone, st.timedeltas(min_value=dt.timedelta(hours=-14), max_value=dt.timedelta(hours=14))
)
times = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1), timezones=utc_offsets
)
hostnames = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,20}[A-Za-z0-9])?", fullmatch=True)
env_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True).filter(
    lambda n: not n.upper().startswith("KOHAKURIVER_")
)
segments = st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True).filter(lambda s: s != "..")
abs_paths = st.lists(segments, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
mounts = st.builds(
    lambda src, dst, opt: f"{src}:{dst}{opt}", abs_paths, abs_paths, st.sampled_from(["", ":ro", ":rw"])
)
env_names_ = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,30}", fullmatch=True)
images = st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,30}(:[A-Za-z0-9._-]{1,10})?", fullmatch=True)
gpu_lists = st.lists(st.integers(0, 4095), unique=True, max_size=4)
targets_plain = st.builds(Target, hostnames, st.none() | st.integers(0, 1023)).map(format_target)
targets_any = st.builds(
    Target,
    hostnames,
    st.none() | st.integers(0, 1023),
    st.lists(st.integers(0, 4095), unique=True, max_size=3),
).map(format_target)
memory_limits = st.none() | st.integers(6 << 20, 1 << 45)


def fake_key(key_type: str, body: bytes) -> str:
    blob = struct.pack(">I", len(key_type)) + key_type.encode() + body
    return f"{key_type} {base64.b64encode(blob).decode()}"


ssh_keys = st.builds(
    lambda t, body, comment: fake_key(t, body) + (f" {comment}" if comment else ""),
    st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256"]),
    st.binary(min_size=1, max_size=64),
    st.none() | st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}", fullmatch=True),
)


@st.composite
def command_specs(draw):
    image_choice = draw(st.sampled_from(["none", "env", "registry"]))
    gpus = draw(gpu_lists)
    targets = draw(st.lists(targets_plain if gpus else targets_any, min_size=1 if gpus else 0, max_size=3))
    return CommandTaskSpec(
        command=draw(non_blank),
        arguments=draw(st.lists(text, max_size=5)),
        env_vars=draw(st.dictionaries(env_names, text, max_size=4)),
        required_cores=draw(st.integers(0, 256)),
        required_memory_bytes=draw(memory_limits),
        required_gpus=gpus,
        targets=targets,
        container_name=draw(env_names_) if image_choice == "env" else None,
        registry_image=draw(images) if image_choice == "registry" else None,
        working_dir=draw(st.none() | abs_paths),
        privileged=draw(st.booleans()),
        additional_mounts=draw(st.lists(mounts, max_size=3)),
        name=draw(st.none() | one_line),
    )


@st.composite
def vps_specs(draw):
    backend = draw(st.sampled_from(list(VpsBackend)))
    mode = draw(st.sampled_from(list(SshKeyMode)))
    gpus = draw(gpu_lists)
    target = draw(targets_plain) if gpus else draw(st.none() | targets_any)
    docker = backend is VpsBackend.DOCKER
    image_choice = draw(st.sampled_from(["none", "env", "registry"])) if docker else "none"
    return VpsSpec(
        name=draw(st.none() | one_line),
        required_cores=draw(st.integers(0, 64)),
        required_memory_bytes=draw(memory_limits) if docker else None,
        required_gpus=gpus,
        target=target,
        container_name=draw(env_names_) if image_choice == "env" else None,
        registry_image=draw(images) if image_choice == "registry" else None,
        privileged=draw(st.booleans()) if docker else False,
        additional_mounts=draw(st.lists(mounts, max_size=2)) if docker else [],
        ssh_key_mode=mode,
        ssh_public_key=draw(ssh_keys) if mode in (SshKeyMode.UPLOAD, SshKeyMode.GENERATE) else None,
        vps_backend=backend,
        vm_image=None if docker else draw(st.none() | env_names_),
        vm_disk_size=None if docker else draw(st.none() | st.sampled_from(["50G", "1T", "512MiB", "20GB"])),
        memory_mb=None if docker else draw(st.none() | st.integers(64, 1 << 20)),
    )


@st.composite
def task_records(draw):
    task_type = draw(st.sampled_from(list(TaskType)))
    vps = task_type is TaskType.VPS
    return TaskRecord(
        task_id=draw(ids),
        task_type=task_type,
        status=draw(st.sampled_from(list(TaskStatus))),
        submitted_at=draw(times),
        batch_id=draw(st.none() | ids),
        name=draw(st.none() | one_line),
        owner=draw(st.none() | one_line),
        owner_id=draw(st.none() | small),
        command=draw(non_blank) if not vps else draw(st.none() | text),
        arguments=draw(st.lists(text, max_size=3)),
        env_vars=draw(st.dictionaries(env_names, text, max_size=3)),
        container_name=draw(st.none() | env_names_),
        registry_image=draw(st.none() | images),
        docker_image_name=draw(st.none() | images),
        working_dir=draw(st.none() | abs_paths),
        privileged=draw(st.booleans()),
        additional_mounts=draw(st.lists(mounts, max_size=2)),
        required_cores=draw(st.integers(0, 256)),
        required_memory_bytes=draw(st.none() | small),
        required_gpus=draw(gpu_lists),
        target=draw(st.none() | targets_any),
        target_numa_node_id=draw(st.none() | st.integers(0, 1023)),
        assigned_node=draw(st.none() | hostnames),
        vps_backend=draw(st.sampled_from(list(VpsBackend))) if vps else None,
        ssh_key_mode=draw(st.sampled_from(list(SshKeyMode))) if vps else None,
        ssh_port=draw(st.none() | st.integers(1, 65535)),
        vm_image=draw(st.none() | env_names_),
        vm_disk_size=draw(st.none() | st.sampled_from(["50G", "100GiB"])),
        vm_ip=draw(st.none() | st.just("10.200.0.5")),
        memory_mb=draw(st.none() | small),
        exit_code=draw(st.none() | st.integers(-(1 << 31), (1 << 31) - 1)),
        error_message=draw(st.none() | text),
        status_message=draw(st.none() | text),
        approved_by=draw(st.none() | one_line),
        approved_at=draw(st.none() | times),
        started_at=draw(st.none() | times),
        completed_at=draw(st.none() | times),
    )


gpu_infos = st.builds(
    GpuInfo,
    gpu_id=st.integers(0, 4095),
    name=one_line,
    driver_version=one_line,
    pci_bus_id=one_line,
    gpu_utilization=metric,
    graphics_clock_mhz=metric,
    mem_utilization=metric,
    mem_clock_mhz=metric,
    memory_total_mib=metric,
    memory_used_mib=metric,
    memory_free_mib=metric,
    temperature=metric,
    fan_speed=metric,
    power_usage_mw=metric,
    power_limit_mw=metric,
    vfio_bound=st.booleans(),
)
gpu_info_lists = st.lists(gpu_infos, max_size=4, unique_by=lambda g: g.gpu_id)
numa = st.none() | st.dictionaries(
    st.integers(0, 1023),
    st.builds(
        NumaNode,
        cores=st.lists(st.integers(0, 1023), unique=True, max_size=8),
        memory_bytes=st.none() | small,
    ),
    max_size=4,
)
runner_urls = st.builds(
    lambda scheme, host, port: f"{scheme}://{host}" + (f":{port}" if port else ""),
    st.sampled_from(["http", "https"]),
    st.sampled_from(["10.0.0.5", "gpu-1.lab", "[::1]", "localhost"]),
    st.none() | st.integers(1, 65535),
)
status_updates = st.builds(
    StatusUpdate,
    task_id=ids,
    status=st.sampled_from(list(TaskStatus)),
    exit_code=st.none() | st.integers(-1, 255),
    message=st.none() | text,
    started_at=st.none() | times,
    completed_at=st.none() | times,
    ssh_port=st.none() | st.integers(1, 65535),
)
registrations = st.builds(
    NodeRegistration,
    hostname=hostnames,
    url=runner_urls,
    total_cores=st.integers(1, 512),
    memory_total_bytes=small,
    numa_topology=numa,
    gpu_info=gpu_info_lists,
    runner_version=one_line,
    docker_available=st.booleans(),
    docker_error=st.none() | text,
    vm_capable=st.booleans(),
)
heartbeats = st.builds(
    Heartbeat,
    running_tasks=st.lists(ids, max_size=5),
    finished_tasks=st.lists(status_updates, max_size=3),
    cpu_percent=finite,
    memory_percent=finite,
    memory_used_bytes=small,
    memory_total_bytes=small,
    current_avg_temp=temps,
    current_max_temp=temps,
    gpu_info=gpu_info_lists,
    numa_topology=numa,
    docker_available=st.booleans(),
    docker_error=st.none() | text,
    runner_version=one_line,
    vm_capable=st.booleans(),
)
node_infos = st.builds(
    NodeInfo,
    hostname=hostnames,
    url=runner_urls,
    status=st.sampled_from(list(NodeStatus)),
    total_cores=st.integers(0, 512),
    memory_total_bytes=small,
    last_heartbeat=st.none() | times,
    numa_topology=numa,
    gpu_info=gpu_info_lists,
    runner_version=one_line,
    docker_available=st.booleans(),
    docker_error=st.none() | text,
    vm_capable=st.booleans(),
    cpu_percent=finite,
    memory_percent=finite,
    memory_used_bytes=small,
    current_avg_temp=temps,
    current_max_temp=temps,
    cores_in_use=st.integers(0, 512),
    available_cores=st.integers(0, 512),
    memory_reserved_bytes=small,
    gpus_in_use=st.lists(st.integers(0, 64), unique=True, max_size=4),
    running_task_count=st.integers(0, 100),
)
api_errors = st.builds(
    ApiError,
    error=st.sampled_from(["invalid", "not_found", "forbidden", "conflict"]),
    message=text,
    field=st.none() | one_line,
)

MODELS = {
    CommandTaskSpec: command_specs(),
    VpsSpec: vps_specs(),
    TaskRecord: task_records(),
    StatusUpdate: status_updates,
    GpuInfo: gpu_infos,
    NodeRegistration: registrations,
    Heartbeat: heartbeats,
    NodeInfo: node_infos,
    ApiError: api_errors,
}


def json_round_trip(obj):
    raw = conv.unstructure(obj)
    text_ = json.dumps(raw)
    assert json.loads(text_) == raw, "unstructure() must already be JSON-shaped (str keys, no tuples/enums)"
    return conv.structure(json.loads(text_), type(obj))


# -- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_every_model_round_trips_through_json(cls):
    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(MODELS[cls])
    def check(obj):
        assert json_round_trip(obj) == obj
        assert conv.loads(conv.dumps(obj), cls) == obj

    check()


@given(st.lists(task_records(), max_size=3))
@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow])
def test_lists_of_models_round_trip(records):
    assert conv.structure(json.loads(json.dumps(conv.unstructure(records))), list[TaskRecord]) == records


def test_json_conventions():
    record = TaskRecord(
        task_id=9007199254740993,  # > 2**53: must survive JavaScript
        task_type=TaskType.VPS,
        status=TaskStatus.RUNNING,
        submitted_at=dt.datetime(2025, 4, 10, 10, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        started_at=dt.datetime(2025, 4, 10, 8, 30, 0, 250000, tzinfo=dt.UTC),
        batch_id=1,
    )
    raw = conv.unstructure(record)
    assert raw["task_id"] == "9007199254740993" and raw["batch_id"] == "1"
    assert raw["task_type"] == "vps" and raw["status"] == "running"
    assert raw["submitted_at"] == "2025-04-10T08:30:00Z"
    assert raw["started_at"] == "2025-04-10T08:30:00.250000Z"
    assert type(raw["status"]) is str
    hb = Heartbeat(numa_topology={0: NumaNode(cores=[0, 1], memory_bytes=5)}, running_tasks=[3])
    assert conv.unstructure(hb)["numa_topology"] == {"0": {"cores": [0, 1], "memory_bytes": 5}}
    assert conv.unstructure(hb)["running_tasks"] == ["3"]


def test_input_leniency_that_is_allowed():
    base = {"task_type": "command", "status": "running", "command": "x"}
    by_int = conv.structure({**base, "task_id": 5, "submitted_at": 1744273800}, TaskRecord)
    by_str = conv.structure({**base, "task_id": "5", "submitted_at": "2025-04-10T10:30:00+02:00"}, TaskRecord)
    assert by_int == by_str
    assert by_str.submitted_at.tzinfo == dt.UTC
    # records from a newer peer may carry fields this version does not know
    assert (
        conv.structure({**base, "task_id": "5", "submitted_at": 0, "new_field": 1}, TaskRecord).task_id == 5
    )


# -- invalid input: ValidationError naming the field ---------------------------------------------------------


def field_of(data, cls):
    with pytest.raises(ValidationError) as info:
        conv.structure(data, cls)
    return info.value.field, info.value.message


CMD = {"command": "python"}


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({**CMD, "required_cores": -1}, "required_cores", ">= 0"),
        ({**CMD, "required_cores": "2"}, "required_cores", "integer"),
        ({**CMD, "required_cores": True}, "required_cores", "integer"),
        ({**CMD, "required_cores": 2.0}, "required_cores", "integer"),
        ({**CMD, "env_vars": {"FOO": 1}}, "env_vars.FOO", "string"),
        ({**CMD, "env_vars": {"1FOO": "x"}}, "env_vars.1FOO", "variable name"),
        ({**CMD, "env_vars": {"A-B": "x"}}, "env_vars.A-B", "variable name"),
        ({**CMD, "env_vars": {"KOHAKURIVER_TUNNEL_URL": "x"}}, "env_vars.KOHAKURIVER_TUNNEL_URL", "reserved"),
        ({**CMD, "env_vars": ["A=1"]}, "env_vars", "object"),
        ({**CMD, "arguments": ["ok", None]}, "arguments[1]", "string"),
        ({**CMD, "arguments": "a b"}, "arguments", "array"),
        ({**CMD, "arguments": ["a\x00b"]}, "arguments[0]", "NUL"),
        ({"command": ""}, "command", "empty"),
        ({"command": "   "}, "command", "empty"),
        ({}, "command", "required"),
        ({**CMD, "required_memory_bytes": 1024}, "required_memory_bytes", "6 MiB"),
        ({**CMD, "required_gpus": [0, 0], "targets": ["n"]}, "required_gpus[1]", "duplicate"),
        ({**CMD, "required_gpus": [0]}, "required_gpus", "target"),
        ({**CMD, "required_gpus": [0], "targets": ["n::1"]}, "targets[0]", "not both"),
        ({**CMD, "targets": ["ok", "bad host"]}, "targets[1]", "hostname"),
        ({**CMD, "targets": ["n:x"]}, "targets[0]", "NUMA"),
        ({**CMD, "additional_mounts": ["/a:/b", "rel:/b"]}, "additional_mounts[1]", "absolute"),
        ({**CMD, "additional_mounts": ["/a:/b:rx"]}, "additional_mounts[0]", "'ro' or 'rw'"),
        ({**CMD, "additional_mounts": ["/a/../etc:/b"]}, "additional_mounts[0]", ".."),
        ({**CMD, "additional_mounts": ["/a:/"]}, "additional_mounts[0]", "root"),
        ({**CMD, "working_dir": "tmp"}, "working_dir", "absolute"),
        ({**CMD, "container_name": "a b"}, "container_name", "environment name"),
        ({**CMD, "registry_image": "-rm"}, "registry_image", "image reference"),
        ({**CMD, "container_name": "env", "registry_image": "ubuntu"}, "registry_image", "not both"),
        ({**CMD, "privileged": "yes"}, "privileged", "true or false"),
        ({**CMD, "name": "two\nlines"}, "name", "one line"),
        ({**CMD, "task_type": "vps"}, "task_type", "command"),
        ({**CMD, "task_type": "job"}, "task_type", "one of"),
        ({**CMD, "required_core": 4}, "required_core", "unknown field"),
        ([CMD], "body", "object"),
        ("python", "body", "object"),
    ],
)
def test_command_spec_errors(data, field, fragment):
    got_field, message = field_of(data, CommandTaskSpec)
    assert got_field == field
    assert fragment in message


KEY = fake_key("ssh-ed25519", b"\x00" * 32)
RSA_LABEL = KEY.replace("ssh-ed25519 ", "ssh-rsa ")
PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----"
UP = {"ssh_key_mode": "upload"}


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"ssh_key_mode": "upload"}, "ssh_public_key", "required"),
        ({"ssh_key_mode": "none", "ssh_public_key": KEY}, "ssh_public_key", "only used"),
        ({"ssh_key_mode": "generate"}, "ssh_public_key", "required"),
        ({**UP, "ssh_public_key": KEY + "\n"}, "ssh_public_key", "line"),
        ({**UP, "ssh_public_key": "ssh-ed25519"}, "ssh_public_key", "expected"),
        ({**UP, "ssh_public_key": "ssh-ed25519 !!!"}, "ssh_public_key", "base64"),
        ({**UP, "ssh_public_key": 'command="x" ' + KEY}, "ssh_public_key", "unsupported"),
        ({**UP, "ssh_public_key": RSA_LABEL}, "ssh_public_key", "does not match"),
        ({**UP, "ssh_public_key": PRIVATE}, "ssh_public_key", "private key"),
        ({"ssh_key_mode": "maybe"}, "ssh_key_mode", "one of"),
        ({"vps_backend": "lxc"}, "vps_backend", "one of"),
        ({"vm_image": "ubuntu"}, "vm_image", "qemu"),
        ({"memory_mb": 1024}, "memory_mb", "qemu"),
        ({"vps_backend": "qemu", "registry_image": "ubuntu"}, "registry_image", "docker"),
        ({"vps_backend": "qemu", "required_memory_bytes": 1 << 30}, "required_memory_bytes", "memory_mb"),
        ({"vps_backend": "qemu", "privileged": True}, "privileged", "docker"),
        ({"vps_backend": "qemu", "vm_disk_size": "lots"}, "vm_disk_size", "size"),
        ({"vps_backend": "qemu", "memory_mb": 8}, "memory_mb", ">= 64"),
        ({"target": "n::0", "required_gpus": [1]}, "target", "not both"),
        ({"target": "n:a"}, "target", "NUMA"),
        ({"targets": ["n"]}, "targets", "unknown field"),
    ],
)  # fmt: skip
def test_vps_spec_errors(data, field, fragment):
    got_field, message = field_of(data, VpsSpec)
    assert got_field == field
    assert fragment in message


GPU = {"gpu_id": 0}
UPD = {"task_id": "1", "status": "running"}
REG = {"hostname": "gpu1", "url": "http://10.0.0.5:8001", "total_cores": 8, "memory_total_bytes": 1 << 34}


@pytest.mark.parametrize(
    ("cls", "data", "field", "fragment"),
    [
        (NodeRegistration, {**REG, "hostname": "gpu 1"}, "hostname", "hostname"),
        (NodeRegistration, {**REG, "hostname": "a:b"}, "hostname", "hostname"),
        (NodeRegistration, {**REG, "url": "ftp://x"}, "url", "http"),
        (NodeRegistration, {**REG, "url": "http://u:p@x:1"}, "url", "credentials"),
        (NodeRegistration, {**REG, "url": "http://x:99999"}, "url", "URL"),
        (NodeRegistration, {**REG, "url": "http://x/api"}, "url", "base URL"),
        (NodeRegistration, {**REG, "total_cores": 0}, "total_cores", ">= 1"),
        (NodeRegistration, {**REG, "memory_total_bytes": -5}, "memory_total_bytes", ">= 0"),
        (NodeRegistration, {**REG, "gpu_info": [GPU, {**GPU, "temperature": -7}]}, "gpu_info[1].temperature",
         ">= -1"),
        (NodeRegistration, {**REG, "gpu_info": [GPU, GPU]}, "gpu_info[1].gpu_id", "duplicate"),
        (NodeRegistration, {**REG, "gpu_info": [5]}, "gpu_info[0]", "object"),
        (NodeRegistration, {**REG, "numa_topology": {"x": {}}}, "numa_topology.x", "NUMA node id"),
        (NodeRegistration, {**REG, "numa_topology": {"0": {"cores": [1, 1]}}}, "numa_topology.0.cores[1]",
         "duplicate"),
        (NodeRegistration, {k: v for k, v in REG.items() if k != "url"}, "url", "required"),
        (Heartbeat, {"running_tasks": ["1", "x"]}, "running_tasks[1]", "decimal id"),
        (Heartbeat, {"running_tasks": ["-1"]}, "running_tasks[0]", "decimal id"),
        (Heartbeat, {"cpu_percent": -1}, "cpu_percent", ">= 0"),
        (Heartbeat, {"cpu_percent": "high"}, "cpu_percent", "number"),
        (Heartbeat, {"current_max_temp": 1e400}, "current_max_temp", "finite"),
        (Heartbeat, {"finished_tasks": [{**UPD, "status": "done"}]}, "finished_tasks[0].status", "one of"),
        (Heartbeat, {"finished_tasks": [{**UPD, "ssh_port": 0}]}, "finished_tasks[0].ssh_port", ">= 1"),
        (StatusUpdate, {**UPD, "completed_at": "yesterday"}, "completed_at", "ISO"),
        (StatusUpdate, {**UPD, "started_at": "2025-01-01T00:00:00"}, "started_at", "timezone"),
        (StatusUpdate, {"task_id": "1"}, "status", "required"),
        (TaskRecord, {"task_id": "1", "task_type": "command", "status": "running", "submitted_at": 0},
         "command", "empty"),
        (ApiError, {"error": "Not Found", "message": "x"}, "error", "lower_snake_case"),
        (NodeInfo, {**REG, "status": "sleeping"}, "status", "one of"),
    ],
)  # fmt: skip
def test_node_and_report_errors(cls, data, field, fragment):
    got_field, message = field_of(data, cls)
    assert got_field == field
    assert fragment in message


def test_all_problems_are_listed():
    with pytest.raises(ValidationError) as info:
        conv.structure({"command": 1, "arguments": [1, "x", 2], "privileged": "no"}, CommandTaskSpec)
    fields = [f for f, _ in info.value.errors]
    assert fields == ["command", "arguments[0]", "arguments[2]", "privileged"]


def test_loads_rejects_bad_json():
    for bad in ["{", '{"command": NaN}', b"\xff\xfe", '{"command": Infinity}']:
        with pytest.raises(ValidationError) as info:
            conv.loads(bad, CommandTaskSpec)
        assert info.value.field == "body"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=20,
)


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_garbage_only_ever_raises_validation_error(cls):
    @settings(max_examples=80, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values)
    def check(data):
        try:
            conv.structure(data, cls)
        except ValidationError as exc:
            assert exc.field

    check()


@pytest.mark.parametrize("cls", list(MODELS), ids=lambda c: c.__name__)
def test_one_broken_field_only_ever_raises_validation_error(cls):
    @settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(MODELS[cls], st.data())
    def check(obj, data):
        raw = conv.unstructure(obj)
        key = data.draw(st.sampled_from(sorted(raw)))
        raw[key] = data.draw(json_values)
        try:
            conv.structure(raw, cls)
        except ValidationError as exc:
            assert exc.field and exc.message

    check()


# -- construction in Python is validated too -----------------------------------------------------------------


def test_python_construction_is_validated():
    with pytest.raises(ValidationError) as info:
        CommandTaskSpec(command="x", required_cores=-2)
    assert info.value.field == "required_cores"
    with pytest.raises(ValidationError) as info:
        CommandTaskSpec(command="x", env_vars={"OK": "1", "BAD NAME": "2"})
    assert info.value.field == "env_vars.BAD NAME"
    with pytest.raises(ValidationError):
        TaskRecord(
            task_id=1, task_type=TaskType.VPS, status=TaskStatus.RUNNING, submitted_at=dt.datetime(2025, 1, 1)
        )
    spec = CommandTaskSpec(command="x")
    with pytest.raises(ValidationError):
        attrs.evolve(spec, required_memory_bytes=1)


def test_placements():
    spec = CommandTaskSpec(command="x", targets=["a", "b:1"], required_gpus=[0, 1])
    assert spec.placements() == [Target("a", None, (0, 1)), Target("b", 1, (0, 1))]
    assert CommandTaskSpec(command="x").placements() == [None]
    assert CommandTaskSpec(command="x", targets=["a::3"]).placements() == [Target("a", None, (3,))]
    assert VpsSpec(target="a:0", required_gpus=[2]).placement() == Target("a", 0, (2,))
    assert VpsSpec().placement() is None


def test_mounts():
    assert parse_mount("/data:/mnt/data:ro") == Mount("/data", "/mnt/data", True)
    assert str(parse_mount("/data:/mnt/data")) == "/data:/mnt/data"
    spec = CommandTaskSpec(command="x", additional_mounts=["/a:/b:rw"])
    assert spec.mounts() == [Mount("/a", "/b", False)]


def test_ssh_key_check_accepts_real_shapes():
    check_ssh_public_key(KEY + " me@laptop")
    check_ssh_public_key(fake_key("ecdsa-sha2-nistp256", b"\x01" * 10))


def test_api_error():
    try:
        conv.structure({"command": "x", "required_cores": -1}, CommandTaskSpec)
    except ValidationError as exc:
        err = ApiError.from_validation(exc)
    assert err == ApiError(error="invalid", message="required_cores: must be >= 0", field="required_cores")
    assert err.http_status == 400
    assert ApiError(error="not_found", message="task 1 not found").http_status == 404
