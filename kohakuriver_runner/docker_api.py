"""A small async client for the Docker Engine API (v1.41) over its Unix socket.

Typed calls over one ``httpx.AsyncClient`` whose transport is a constructor argument (the Unix socket by
default, an ``httpx.MockTransport`` in tests). No docker SDK, no ``docker`` CLI, nothing blocking: files are
streamed with ``trio.open_file``. Every call has a default timeout; the calls that legitimately last as long
as a container (``wait``, ``logs(follow=True)``) have none and are cancelled by the caller's cancel scope.
Streaming calls (pull, load, save, non-follow logs) use an *inactivity* timeout per read; a caller that
wants a total deadline wraps the call in ``trio.fail_after``.

Errors: everything raised is a ``DockerError`` (``status`` is the HTTP status, or ``None`` when there is
none): ``NotFound`` (404), ``Conflict`` (409), ``BadRequest`` (400), ``DockerUnavailable`` (the socket is
missing, refuses, or the connection dropped: the runner reports "cannot reach Docker") and ``DockerTimeout``.

Interactive exec (a hijacked, bidirectional connection for terminals) lives in ``docker_exec.py``: httpx
cannot hand over the upgraded connection, so that module speaks h11 on its own Unix-socket stream.
"""

from __future__ import annotations

import base64
import inspect as _inspect
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import attrs
import httpx
import trio

from kohakuriver_runner.docker_logs import MultiplexDecoder, StreamFormatError, StreamType

__all__ = [
    "API_VERSION",
    "DEFAULT_SOCKET",
    "BadRequest",
    "Conflict",
    "ContainerInfo",
    "ContainerSpec",
    "ContainerState",
    "ContainerSummary",
    "DockerClient",
    "DockerError",
    "DockerTimeout",
    "DockerUnavailable",
    "ExecResult",
    "ImageInfo",
    "ImageSummary",
    "Mount",
    "NetworkInfo",
    "NotFound",
    "PathStat",
    "PortBinding",
    "StreamType",
    "VersionInfo",
    "container_ref",
    "parse_time",
    "split_image_ref",
]

log = logging.getLogger("kohakuriver.runner.docker")

DEFAULT_SOCKET = "/var/run/docker.sock"
API_VERSION = "v1.41"

DEFAULT_TIMEOUT = 30.0  # ordinary request/response calls
STREAM_IDLE_TIMEOUT = 300.0  # pull/load/save/logs: longest silence tolerated between two reads
COMMIT_TIMEOUT = 600.0  # committing a big container writes a whole layer
REMOVE_TIMEOUT = 120.0  # removing a container or image deletes its layers
STOP_GRACE_MARGIN = 30.0  # added to the stop timeout: the engine answers only after the kill
_CHUNK = 1 << 20

ProgressCallback = Callable[[Mapping[str, Any]], Awaitable[None] | None]


# ---------------------------------------------------------------------------------------------------------
# Errors


class DockerError(Exception):
    """Anything that went wrong talking to Docker. ``status`` is the HTTP status, ``None`` when there is none
    (engine unreachable, timeout, an error reported inside a streamed response)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message if self.status is None else f"{self.message} (HTTP {self.status})"


class BadRequest(DockerError):
    """400: the engine rejected the parameters (bad memory limit, unknown network mode, ...)."""


class NotFound(DockerError):
    """404: no such container, image, network or exec instance."""


class Conflict(DockerError):
    """409: the object is in the wrong state (name in use, not running, already paused, ...)."""


class DockerUnavailable(DockerError):
    """The engine cannot be reached (socket missing, connection refused or dropped)."""


class DockerTimeout(DockerError):
    """The engine did not answer in time."""


_STATUS_ERRORS: dict[int, type[DockerError]] = {400: BadRequest, 404: NotFound, 409: Conflict}


# ---------------------------------------------------------------------------------------------------------
# Values


@attrs.frozen
class Mount:
    """A bind mount: host ``source`` appears at ``target`` in the container. The source must exist."""

    source: str
    target: str
    read_only: bool = False


@attrs.frozen
class PortBinding:
    """Where a container port is published: ``host_port`` 0 lets the engine pick a free port."""

    host_ip: str = ""
    host_port: int = 0


@attrs.frozen
class VersionInfo:
    version: str
    api_version: str
    min_api_version: str
    os: str
    arch: str
    kernel_version: str


@attrs.frozen
class NetworkInfo:
    id: str
    name: str
    driver: str
    subnet: str | None
    gateway: str | None
    labels: Mapping[str, str]
    #: The driver options (``com.docker.network.bridge.name``, ``...driver.mtu``, ...).
    options: Mapping[str, str] = attrs.field(factory=dict)
    #: IPAM of the first pool: the range the engine gives addresses from, the addresses it never gives.
    ip_range: str | None = None
    aux_addresses: Mapping[str, str] = attrs.field(factory=dict)
    #: Ids of the containers attached to it (running ones: the engine lists endpoints).
    containers: tuple[str, ...] = ()


@attrs.frozen
class ContainerState:
    status: str  # created, running, paused, restarting, removing, exited, dead
    running: bool
    paused: bool
    restarting: bool
    oom_killed: bool
    dead: bool
    pid: int
    exit_code: int
    error: str
    started_at: datetime | None
    finished_at: datetime | None


@attrs.frozen
class ContainerInfo:
    """The parts of ``GET /containers/{id}/json`` the runner uses; ``raw`` holds the whole answer."""

    id: str
    name: str
    image: str  # the reference it was created from
    image_id: str
    state: ContainerState
    labels: Mapping[str, str]
    tty: bool
    restart_count: int
    networks: Mapping[str, str]  # network name -> IPv4 address ("" until started)
    ports: Mapping[str, tuple[PortBinding, ...]]  # "22/tcp" -> where it is published (when running)
    raw: Mapping[str, Any] = attrs.field(repr=False, eq=False)

    @property
    def ip_address(self) -> str | None:
        """The container's address on its first network that has one."""
        return next((ip for ip in self.networks.values() if ip), None)

    def host_port(self, container_port: int | str) -> int | None:
        """The host port a container port is published on (first binding), if any."""
        bindings = self.ports.get(_port_key(container_port)) or ()
        return next((b.host_port for b in bindings if b.host_port), None)


@attrs.frozen
class ContainerSummary:
    """One entry of ``GET /containers/json``."""

    id: str
    name: str
    image: str
    image_id: str
    state: str
    status: str  # human text, "Up 2 minutes"
    created: datetime
    labels: Mapping[str, str]


@attrs.frozen
class ImageInfo:
    id: str
    repo_tags: tuple[str, ...]
    created: datetime | None
    size: int
    labels: Mapping[str, str]


@attrs.frozen
class ImageSummary:
    id: str
    repo_tags: tuple[str, ...]
    created: datetime
    size: int
    labels: Mapping[str, str]


@attrs.frozen
class PathStat:
    """A path in a container (``HEAD /containers/{id}/archive``). ``mode`` is Go's ``os.FileMode`` bits:
    permissions in the low 9 bits, type flags in the high bits (``MODE_DIR``, ``MODE_SYMLINK``)."""

    name: str
    size: int
    mode: int
    link_target: str = ""

    MODE_DIR = 1 << 31
    MODE_SYMLINK = 1 << 27

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & self.MODE_DIR)


@attrs.frozen
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False  # output beyond ``max_output`` was dropped


def _str_tuple(value: Iterable[str | int] | None) -> tuple[str, ...]:
    return tuple(str(v) for v in value or ())


def _cpu_list(value: str | Sequence[int] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return ",".join(str(int(c)) for c in value)


@attrs.frozen(kw_only=True)
class ContainerSpec:
    """Everything ``create_container`` needs. ``cmd`` and ``entrypoint`` are argv lists, never shell text.

    ``entrypoint=[]`` clears the image's entrypoint; ``None`` keeps it. ``memory_bytes`` also sets the
    swap limit to the same value so the container is OOM-killed instead of swapping (where the kernel
    accounts swap; the engine warns otherwise). ``gpu_ids`` become an nvidia device request. ``init`` runs
    Docker's tini as PID 1 so signals reach the command and zombies are reaped.
    """

    name: str
    image: str
    cmd: tuple[str, ...] | None = attrs.field(default=None, converter=attrs.converters.optional(_str_tuple))
    entrypoint: tuple[str, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(_str_tuple)
    )
    env: Mapping[str, str] = attrs.field(factory=dict)
    labels: Mapping[str, str] = attrs.field(factory=dict)
    working_dir: str | None = None
    user: str | None = None
    hostname: str | None = None
    mounts: tuple[Mount, ...] = attrs.field(default=(), converter=tuple)
    cpuset_cpus: str | None = attrs.field(default=None, converter=_cpu_list)
    cpuset_mems: str | None = attrs.field(default=None, converter=_cpu_list)
    nano_cpus: int | None = None
    memory_bytes: int | None = None
    gpu_ids: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    privileged: bool = False
    cap_add: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    network: str | None = None
    ipv4_address: str | None = None
    ports: Mapping[int | str, PortBinding] = attrs.field(factory=dict)
    restart_policy: str | None = None  # "no", "always", "unless-stopped", "on-failure"
    restart_max_retries: int = 0
    init: bool = True
    stop_signal: str | None = None
    stop_timeout: int | None = None
    tty: bool = False
    open_stdin: bool = False
    #: The container's log driver (``HostConfig.LogConfig``) and its options; None = the engine's default.
    log_driver: str | None = None
    log_options: Mapping[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for key in self.env:
            if not key or "=" in key or "\0" in key:
                raise ValueError(f"invalid environment variable name {key!r}")
        if self.memory_bytes is not None and self.memory_bytes <= 0:
            raise ValueError("memory_bytes must be positive")
        if self.nano_cpus is not None and self.nano_cpus <= 0:
            raise ValueError("nano_cpus must be positive")
        if self.ipv4_address and not self.network:
            raise ValueError("a fixed IP address needs a user-defined network")

    def to_api(self) -> dict[str, Any]:
        """The JSON body of ``POST /containers/create`` (the name goes in the query string)."""
        host: dict[str, Any] = {
            "Init": self.init,
            "AutoRemove": False,
            "Privileged": self.privileged,
        }
        if self.mounts:
            host["Mounts"] = [
                {"Type": "bind", "Source": m.source, "Target": m.target, "ReadOnly": m.read_only}
                for m in self.mounts
            ]
        if self.cpuset_cpus is not None:
            host["CpusetCpus"] = self.cpuset_cpus
        if self.cpuset_mems is not None:
            host["CpusetMems"] = self.cpuset_mems
        if self.nano_cpus is not None:
            host["NanoCpus"] = self.nano_cpus
        if self.memory_bytes is not None:
            host["Memory"] = self.memory_bytes
            host["MemorySwap"] = self.memory_bytes
        if self.gpu_ids:
            host["DeviceRequests"] = [
                {"Driver": "nvidia", "DeviceIDs": list(self.gpu_ids), "Capabilities": [["gpu"]]}
            ]
        if self.cap_add:
            host["CapAdd"] = list(self.cap_add)
        if self.network:
            host["NetworkMode"] = self.network
        if self.log_driver:
            host["LogConfig"] = {"Type": self.log_driver, "Config": dict(self.log_options)}
        if self.restart_policy:
            host["RestartPolicy"] = {
                "Name": self.restart_policy,
                "MaximumRetryCount": self.restart_max_retries,
            }
        exposed: dict[str, dict] = {}
        if self.ports:
            bindings: dict[str, list[dict[str, str]]] = {}
            for port, binding in self.ports.items():
                key = _port_key(port)
                exposed[key] = {}
                bindings[key] = [
                    {
                        "HostIp": binding.host_ip,
                        "HostPort": str(binding.host_port) if binding.host_port else "",
                    }
                ]
            host["PortBindings"] = bindings

        body: dict[str, Any] = {
            "Image": self.image,
            "Env": [f"{k}={v}" for k, v in self.env.items()],
            "Labels": dict(self.labels),
            "Tty": self.tty,
            "OpenStdin": self.open_stdin,
            "AttachStdout": False,
            "AttachStderr": False,
            "HostConfig": host,
        }
        if self.cmd is not None:
            body["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            # An empty list means "no entrypoint"; the engine wants [""] for that.
            body["Entrypoint"] = list(self.entrypoint) or [""]
        if self.working_dir:
            body["WorkingDir"] = self.working_dir
        if self.user:
            body["User"] = self.user
        if self.hostname:
            body["Hostname"] = self.hostname
        if exposed:
            body["ExposedPorts"] = exposed
        if self.stop_signal:
            body["StopSignal"] = self.stop_signal
        if self.stop_timeout is not None:
            body["StopTimeout"] = self.stop_timeout
        if self.network and self.ipv4_address:
            body["NetworkingConfig"] = {
                "EndpointsConfig": {self.network: {"IPAMConfig": {"IPv4Address": self.ipv4_address}}}
            }
        return body


# ---------------------------------------------------------------------------------------------------------
# Parsing helpers


def _port_key(port: int | str) -> str:
    text = str(port)
    return text if "/" in text else f"{text}/tcp"


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 time from the engine (nanoseconds allowed); ``None`` for empty or Go's zero time."""
    if not value or value.startswith("0001-01-01"):
        return None
    text = value.replace("Z", "+00:00")
    # Keep at most microseconds: the engine writes nanoseconds.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _time_param(value: datetime | float | int | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        value = value.timestamp()
    return f"{float(value):.9f}"


def _labels(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return dict(value or {})


def _state(data: Mapping[str, Any]) -> ContainerState:
    return ContainerState(
        status=data.get("Status", ""),
        running=bool(data.get("Running")),
        paused=bool(data.get("Paused")),
        restarting=bool(data.get("Restarting")),
        oom_killed=bool(data.get("OOMKilled")),
        dead=bool(data.get("Dead")),
        pid=int(data.get("Pid") or 0),
        exit_code=int(data.get("ExitCode") or 0),
        error=data.get("Error") or "",
        started_at=parse_time(data.get("StartedAt")),
        finished_at=parse_time(data.get("FinishedAt")),
    )


def _container_info(data: Mapping[str, Any]) -> ContainerInfo:
    config = data.get("Config") or {}
    settings = data.get("NetworkSettings") or {}
    networks = {
        name: (net or {}).get("IPAddress") or "" for name, net in (settings.get("Networks") or {}).items()
    }
    ports: dict[str, tuple[PortBinding, ...]] = {}
    for key, bindings in (settings.get("Ports") or {}).items():
        ports[key] = tuple(
            PortBinding(host_ip=b.get("HostIp", ""), host_port=int(b.get("HostPort") or 0))
            for b in bindings or ()
        )
    return ContainerInfo(
        id=data["Id"],
        name=(data.get("Name") or "").lstrip("/"),
        image=config.get("Image", ""),
        image_id=data.get("Image", ""),
        state=_state(data.get("State") or {}),
        labels=_labels(config.get("Labels")),
        tty=bool(config.get("Tty")),
        restart_count=int(data.get("RestartCount") or 0),
        networks=networks,
        ports=ports,
        raw=data,
    )


def _container_summary(data: Mapping[str, Any]) -> ContainerSummary:
    names = data.get("Names") or []
    return ContainerSummary(
        id=data["Id"],
        name=names[0].lstrip("/") if names else "",
        image=data.get("Image", ""),
        image_id=data.get("ImageID", ""),
        state=data.get("State", ""),
        status=data.get("Status", ""),
        created=datetime.fromtimestamp(int(data.get("Created") or 0), UTC),
        labels=_labels(data.get("Labels")),
    )


def _network_info(data: Mapping[str, Any]) -> NetworkInfo:
    configs = (data.get("IPAM") or {}).get("Config") or []
    first = configs[0] if configs else {}
    return NetworkInfo(
        id=data["Id"],
        name=data.get("Name", ""),
        driver=data.get("Driver", ""),
        subnet=first.get("Subnet"),
        gateway=first.get("Gateway"),
        labels=_labels(data.get("Labels")),
        options=_labels(data.get("Options")),
        ip_range=first.get("IPRange") or None,
        aux_addresses=_labels(first.get("AuxiliaryAddresses")),
        containers=tuple(sorted((data.get("Containers") or {}).keys())),
    )


def container_ref(ref: str) -> str:
    """A container name or id as a URL path segment; ``ValueError`` for one that could leave its segment."""
    if not ref or ref.startswith(".") or any(c in ref for c in "/?#% \t\n\0"):
        raise ValueError(f"invalid container name or id {ref!r}")
    return quote(ref, safe=":@")


def _image_ref(ref: str) -> str:
    # Image references contain '/' and ':' and the engine's router expects them unescaped.
    if not ref or any(c in ref for c in "?#% \t\n\0") or any(p in ("", ".", "..") for p in ref.split("/")):
        raise ValueError(f"invalid image reference {ref!r}")
    return quote(ref, safe="/:@")


def split_image_ref(ref: str) -> tuple[str, str]:
    """``"repo/name:tag"`` -> ``("repo/name", "tag")``; a digest stays whole; the tag defaults to latest."""
    if "@" in ref:
        return ref, ""
    name, sep, tag = ref.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return ref, "latest"


def _filters(**values: Iterable[str] | None) -> str | None:
    filters = {k: list(v) for k, v in values.items() if v}
    return json.dumps(filters) if filters else None


def _label_filter(labels: Mapping[str, str | None] | Iterable[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return [k if v is None else f"{k}={v}" for k, v in labels.items()]
    return list(labels)


async def _notify(callback: ProgressCallback | None, event: Mapping[str, Any]) -> None:
    if callback is None:
        return
    result = callback(event)
    if _inspect.isawaitable(result):
        await result


def _stream_error(event: Mapping[str, Any]) -> str | None:
    if "error" in event or "errorDetail" in event:
        detail = event.get("errorDetail") or {}
        return str(detail.get("message") or event.get("error") or "unknown error")
    return None


# ---------------------------------------------------------------------------------------------------------
# The client


class DockerClient:
    """Typed calls to one Docker engine. Use as ``async with DockerClient() as docker:`` or call ``aclose()``.

    ``socket_path`` is the engine's Unix socket; ``transport`` replaces it entirely (tests).
    """

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        api_version: str = API_VERSION,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        if transport is None:
            # Waits and log follows each hold a connection for a container's lifetime: no pool cap, or a
            # busy node would starve its own short calls.
            transport = httpx.AsyncHTTPTransport(
                uds=socket_path,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=16),
            )
        self._client = httpx.AsyncClient(
            transport=transport,
            base_url=f"http://docker/{api_version}",
            timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        )

    async def __aenter__(self) -> DockerClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- plumbing ---------------------------------------------------------------------------------------

    def _timeout(self, seconds: float | None = None) -> httpx.Timeout:
        total = self.timeout if seconds is None else seconds
        return httpx.Timeout(total, connect=min(total, 5.0))

    def _translate(self, method: str, path: str, exc: httpx.HTTPError) -> DockerError:
        where = f"unix://{self.socket_path}"
        if isinstance(exc, httpx.TimeoutException):
            return DockerTimeout(None, f"Docker did not answer {method} {path} in time ({where})")
        if isinstance(exc, httpx.ConnectError):
            reason = exc.__cause__ or exc.__context__ or exc
            return DockerUnavailable(None, f"cannot reach Docker at {where}: {reason}")
        return DockerUnavailable(
            None, f"connection to Docker at {where} failed during {method} {path}: {exc}"
        )

    @staticmethod
    def error_for_status(status: int, body: bytes, what: str) -> DockerError:
        """The ``DockerError`` subclass for an engine answer ``status`` with its JSON ``{"message"}`` body."""
        try:
            message = json.loads(body).get("message") or ""
        except (ValueError, AttributeError):
            message = body.decode("utf-8", "replace").strip()
        return _STATUS_ERRORS.get(status, DockerError)(status, message or f"{what} failed")

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        json_body: Any = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """One call to the engine (``path`` already escaped, e.g. with ``container_ref``): the answer, or the
        ``DockerError`` for its status; also for ``docker_exec``, which builds on this client."""
        if isinstance(params, Mapping):
            params = {k: v for k, v in params.items() if v is not None}
        try:
            resp = await self._client.request(
                method,
                path,
                params=params,
                json=json_body,
                content=content,
                headers=headers,
                timeout=self._timeout(timeout),
            )
        except httpx.HTTPError as exc:
            raise self._translate(method, path, exc) from exc
        if resp.status_code >= 400:
            raise self.error_for_status(resp.status_code, resp.content, f"{method} {path}")
        return resp

    @asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
        content: Any = None,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
        timeout: httpx.Timeout,
    ) -> AsyncIterator[httpx.Response]:
        if isinstance(params, Mapping):
            params = {k: v for k, v in params.items() if v is not None}
        try:
            async with self._client.stream(
                method, path, params=params, content=content, json=json_body, headers=headers, timeout=timeout
            ) as resp:
                if resp.status_code >= 400:
                    raise self.error_for_status(resp.status_code, await resp.aread(), f"{method} {path}")
                yield resp
        except httpx.HTTPError as exc:
            raise self._translate(method, path, exc) from exc
        except StreamFormatError as exc:
            raise DockerError(None, f"malformed output stream from Docker ({method} {path}): {exc}") from exc

    async def _json_events(
        self, resp: httpx.Response, progress: ProgressCallback | None
    ) -> AsyncIterator[dict]:
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"stream": line}
            if not isinstance(event, dict):
                continue
            error = _stream_error(event)
            if error is not None:
                raise DockerError(None, error)
            await _notify(progress, event)
            yield event

    # -- engine -----------------------------------------------------------------------------------------

    async def ping(self, *, timeout: float = 5.0) -> None:
        """Raise ``DockerUnavailable`` (or another ``DockerError``) unless the engine answers."""
        await self.request("GET", "/_ping", timeout=timeout)

    async def unavailable_reason(self, *, timeout: float = 5.0) -> str | None:
        """``None`` when the engine answers, else one line saying why not (for start-up and heartbeats)."""
        try:
            await self.ping(timeout=timeout)
        except DockerError as exc:
            return str(exc)
        return None

    async def version(self) -> VersionInfo:
        data = (await self.request("GET", "/version")).json()
        return VersionInfo(
            version=data.get("Version", ""),
            api_version=data.get("ApiVersion", ""),
            min_api_version=data.get("MinAPIVersion", ""),
            os=data.get("Os", ""),
            arch=data.get("Arch", ""),
            kernel_version=data.get("KernelVersion", ""),
        )

    # -- networks ---------------------------------------------------------------------------------------

    async def inspect_network(self, name: str) -> NetworkInfo:
        data = (await self.request("GET", f"/networks/{container_ref(name)}")).json()
        # The engine also matches id prefixes: only an exact name (or full id) counts.
        if data.get("Name") != name and data.get("Id") != name:
            raise NotFound(404, f"network {name} not found")
        return _network_info(data)

    async def ensure_network(
        self,
        name: str,
        subnet: str,
        gateway: str,
        *,
        labels: Mapping[str, str] | None = None,
        options: Mapping[str, str] | None = None,
    ) -> NetworkInfo:
        """Create a bridge network with this subnet and gateway unless it exists.

        An existing network with another subnet, gateway or driver raises ``Conflict`` naming both values
        (the runner must not silently use addresses the configuration does not expect).
        """
        for _attempt in range(3):
            try:
                existing = await self.inspect_network(name)
            except NotFound:
                pass
            else:
                if (existing.driver, existing.subnet, existing.gateway) != ("bridge", subnet, gateway):
                    raise Conflict(
                        409,
                        f"network {name} exists with driver {existing.driver}, subnet {existing.subnet}, "
                        f"gateway {existing.gateway}; configured: bridge, {subnet}, {gateway} "
                        f"(remove it or change the configuration)",
                    )
                return existing
            body = {
                "Name": name,
                "Driver": "bridge",
                "CheckDuplicate": True,
                "IPAM": {"Driver": "default", "Config": [{"Subnet": subnet, "Gateway": gateway}]},
                "Labels": dict(labels or {}),
                "Options": dict(options or {}),
            }
            try:
                await self.request("POST", "/networks/create", json_body=body)
            except Conflict:
                continue  # created concurrently: inspect it again
        return await self.inspect_network(name)

    async def create_network(
        self,
        name: str,
        subnet: str,
        gateway: str,
        *,
        ip_range: str | None = None,
        aux_addresses: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        options: Mapping[str, str] | None = None,
    ) -> NetworkInfo:
        """Create a bridge network (``Conflict`` if the name is taken). ``ip_range``: where the engine picks
        addresses for containers that ask for none (fixed addresses may lie anywhere in ``subnet``);
        ``aux_addresses``: addresses it never gives to a container."""
        pool: dict[str, Any] = {"Subnet": subnet, "Gateway": gateway}
        if ip_range:
            pool["IPRange"] = ip_range
        if aux_addresses:
            pool["AuxiliaryAddresses"] = dict(aux_addresses)
        body = {
            "Name": name,
            "Driver": "bridge",
            "CheckDuplicate": True,
            "IPAM": {"Driver": "default", "Config": [pool]},
            "Labels": dict(labels or {}),
            "Options": dict(options or {}),
        }
        await self.request("POST", "/networks/create", json_body=body)
        return await self.inspect_network(name)

    async def remove_network(self, name: str) -> None:
        await self.request("DELETE", f"/networks/{container_ref(name)}")

    # -- containers -------------------------------------------------------------------------------------

    async def create_container(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; return its id. ``Conflict`` if the name is taken."""
        resp = await self.request(
            "POST", "/containers/create", params={"name": spec.name}, json_body=spec.to_api(), timeout=60.0
        )
        data = resp.json()
        for warning in data.get("Warnings") or ():
            log.warning("docker create %s: %s", spec.name, warning)
        return data["Id"]

    async def start(self, container: str) -> None:
        """Start a container (a no-op if it is already running)."""
        await self.request("POST", f"/containers/{container_ref(container)}/start", timeout=60.0)

    async def inspect(self, container: str) -> ContainerInfo:
        data = (await self.request("GET", f"/containers/{container_ref(container)}/json")).json()
        return _container_info(data)

    async def list_containers(
        self,
        *,
        labels: Mapping[str, str | None] | Iterable[str] | None = None,
        name: str | None = None,
        all: bool = True,
    ) -> list[ContainerSummary]:
        """Containers matching every label filter (``{"key": "value"}``, ``{"key": None}`` = has the key).

        ``name`` is the engine's name filter (a regular expression, not an exact match).
        """
        filters = _filters(label=_label_filter(labels), name=[name] if name else None)
        data = (await self.request("GET", "/containers/json", params={"all": all, "filters": filters})).json()
        return [_container_summary(item) for item in data]

    async def wait(self, container: str, *, condition: str = "not-running", reconnect: bool = True) -> int:
        """Block until the container is not running; return its exit code. No timeout: cancel to stop.

        A container that was created but never started counts as not running: call this after ``start``.
        This is the engine's long-poll ``POST /containers/{id}/wait``. If the connection drops (the engine
        restarted) and ``reconnect`` is true, it waits for the engine to come back and asks again; with
        ``not-running`` an already-exited container answers at once, so no exit is missed.
        """
        path = f"/containers/{container_ref(container)}/wait"
        timeout = httpx.Timeout(None, connect=5.0, write=self.timeout, pool=self.timeout)
        delay = 0.5
        while True:
            try:
                async with self._stream(
                    "POST", path, params={"condition": condition}, timeout=timeout
                ) as resp:
                    body = await resp.aread()
                data = json.loads(body)
            except (DockerUnavailable, ValueError) as exc:
                if not reconnect:
                    raise DockerUnavailable(None, f"lost the wait on {container}: {exc}") from exc
                log.info("waiting on %s: %s; retrying in %.1fs", container, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 15.0)
                continue
            error = (data.get("Error") or {}).get("Message")
            if error:
                raise DockerError(None, f"waiting for {container}: {error}")
            return int(data["StatusCode"])

    async def kill(self, container: str, signal: str | int = "SIGKILL") -> None:
        """Send a signal. ``Conflict`` if the container is not running."""
        await self.request(
            "POST", f"/containers/{container_ref(container)}/kill", params={"signal": str(signal)}
        )

    async def stop(self, container: str, timeout: int = 10) -> None:
        """SIGTERM (or the stop signal), then SIGKILL after ``timeout`` seconds. No-op if already stopped."""
        await self.request(
            "POST",
            f"/containers/{container_ref(container)}/stop",
            params={"t": int(timeout)},
            timeout=timeout + STOP_GRACE_MARGIN,
        )

    async def restart(self, container: str, timeout: int = 10) -> None:
        await self.request(
            "POST",
            f"/containers/{container_ref(container)}/restart",
            params={"t": int(timeout)},
            timeout=timeout + STOP_GRACE_MARGIN,
        )

    async def pause(self, container: str) -> None:
        """Freeze every process (cgroup freezer). ``Conflict`` if not running or already paused."""
        await self.request("POST", f"/containers/{container_ref(container)}/pause")

    async def unpause(self, container: str) -> None:
        await self.request("POST", f"/containers/{container_ref(container)}/unpause")

    async def remove(self, container: str, *, force: bool = False, volumes: bool = False) -> None:
        """Remove a container (``force`` kills it first). ``NotFound`` if there is no such container."""
        await self.request(
            "DELETE",
            f"/containers/{container_ref(container)}",
            params={"force": force, "v": volumes},
            timeout=REMOVE_TIMEOUT,
        )

    async def logs(
        self,
        container: str,
        *,
        stdout: bool = True,
        stderr: bool = True,
        follow: bool = False,
        since: datetime | float | None = None,
        until: datetime | float | None = None,
        tail: int | None = None,
        timestamps: bool = False,
        tty: bool | None = None,
    ) -> AsyncIterator[tuple[StreamType, bytes]]:
        """Yield ``(stream, data)`` pieces of the container's output, in order.

        ``follow`` keeps going until the container stops (no timeout; cancel to stop early). Chunk
        boundaries are arbitrary: they are not lines. ``tty`` says whether the container has a TTY (its
        output is then unframed and all reported as stdout); ``None`` asks the engine. Close the iterator
        when leaving it early (``async with contextlib.aclosing(docker.logs(...)) as it:``).
        """
        if tty is None:
            tty = (await self.inspect(container)).tty
        params = {
            "stdout": stdout,
            "stderr": stderr,
            "follow": follow,
            "since": _time_param(since),
            "until": _time_param(until),
            "tail": "all" if tail is None else str(int(tail)),
            "timestamps": timestamps,
        }
        read = None if follow else STREAM_IDLE_TIMEOUT
        timeout = httpx.Timeout(self.timeout, connect=5.0, read=read)
        path = f"/containers/{container_ref(container)}/logs"
        async with self._stream("GET", path, params=params, timeout=timeout) as resp:
            if tty:
                async for data in resp.aiter_bytes():
                    yield StreamType.STDOUT, data
                return
            decoder = MultiplexDecoder()
            async for data in resp.aiter_bytes():
                decoder.receive_data(data)
                for chunk in decoder.chunks():
                    yield chunk.stream, chunk.data
            decoder.close()

    async def events(
        self, *, filters: Mapping[str, Sequence[str]], since: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The engine's event stream (``GET /events``) as decoded JSON objects, matching ``filters``
        (``{"type": ["container"], "event": ["die"], "label": ["k=v"]}``). No timeout: it lasts until the
        caller stops reading or the connection drops (``DockerUnavailable``). Close it when leaving early."""
        encoded = json.dumps({key: list(values) for key, values in filters.items()})
        params = {"filters": encoded, "since": _time_param(since)}
        timeout = httpx.Timeout(self.timeout, connect=5.0, read=None)
        async with self._stream("GET", "/events", params=params, timeout=timeout) as resp:
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    yield event

    # -- exec (non-interactive) -------------------------------------------------------------------------

    async def exec_create(
        self,
        container: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        privileged: bool = False,
    ) -> str:
        """Prepare a command (argv) in a running container; return the exec id (``Conflict``: not running)."""
        if not cmd:
            raise ValueError("exec needs a command")
        body: dict[str, Any] = {
            "Cmd": [str(c) for c in cmd],
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "Tty": False,
            "Privileged": privileged,
            "Env": [f"{k}={v}" for k, v in (env or {}).items()],
        }
        if workdir:
            body["WorkingDir"] = workdir
        if user:
            body["User"] = user
        resp = await self.request("POST", f"/containers/{container_ref(container)}/exec", json_body=body)
        return resp.json()["Id"]

    async def exec_start(
        self, exec_id: str, *, timeout: float | None = 300.0, max_output: int = 64 << 20
    ) -> ExecResult:
        """Run a prepared exec to completion; return its exit code and output.

        Output beyond ``max_output`` bytes per stream is read and dropped (``truncated`` is set). On
        ``DockerTimeout`` the process may still be running inside the container.
        """
        out, err = bytearray(), bytearray()
        truncated = False
        path = f"/exec/{container_ref(exec_id)}/start"
        http_timeout = httpx.Timeout(self.timeout, connect=5.0, read=None)
        with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
            # Without an Upgrade header the engine answers 200 and streams until the process ends.
            async with self._stream(
                "POST", path, json_body={"Detach": False, "Tty": False}, timeout=http_timeout
            ) as resp:
                decoder = MultiplexDecoder()
                async for data in resp.aiter_bytes():
                    decoder.receive_data(data)
                    for chunk in decoder.chunks():
                        target = err if chunk.stream == StreamType.STDERR else out
                        room = max_output - len(target)
                        if room < len(chunk.data):
                            truncated = True
                        target += chunk.data[: max(room, 0)]
                decoder.close()
            exit_code = await self._exec_exit_code(exec_id)
        if scope.cancelled_caught:
            raise DockerTimeout(None, f"exec {exec_id[:12]} did not finish within {timeout} s")
        return ExecResult(exit_code=exit_code, stdout=bytes(out), stderr=bytes(err), truncated=truncated)

    async def _exec_exit_code(self, exec_id: str) -> int:
        # The output stream can end a moment before the engine records the exit code.
        delay = 0.01
        while True:
            data = (await self.request("GET", f"/exec/{container_ref(exec_id)}/json")).json()
            if not data.get("Running") and data.get("ExitCode") is not None:
                return int(data["ExitCode"])
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def exec_run(
        self,
        container: str,
        cmd: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        privileged: bool = False,
        timeout: float | None = 300.0,
        max_output: int = 64 << 20,
    ) -> ExecResult:
        """``exec_create`` + ``exec_start``."""
        exec_id = await self.exec_create(
            container, cmd, env=env, workdir=workdir, user=user, privileged=privileged
        )
        return await self.exec_start(exec_id, timeout=timeout, max_output=max_output)

    # -- files (the archive API) -------------------------------------------------------------------------

    async def stat_path(self, container: str, path: str) -> PathStat:
        """``HEAD /containers/{id}/archive``: what is at ``path`` in the container's filesystem (it may be
        created but not started). ``NotFound`` when there is nothing there (or no such container)."""
        resp = await self.request(
            "HEAD", f"/containers/{container_ref(container)}/archive", params={"path": path}
        )
        header = resp.headers.get("X-Docker-Container-Path-Stat", "")
        try:
            data = json.loads(base64.b64decode(header)) if header else {}
        except ValueError:
            data = {}
        return PathStat(
            name=str(data.get("name") or os.path.basename(path)),
            size=int(data.get("size") or 0),
            mode=int(data.get("mode") or 0),
            link_target=str(data.get("linkTarget") or ""),
        )

    async def put_archive(self, container: str, path: str, tar_bytes: bytes) -> None:
        """Extract a tar archive into the container at directory ``path`` (``PUT /containers/{id}/archive``).

        Works on a created container before it starts. ``NotFound`` if ``path`` does not exist.
        """
        await self.request(
            "PUT",
            f"/containers/{container_ref(container)}/archive",
            params={"path": path},
            content=tar_bytes,
            headers={"Content-Type": "application/x-tar"},
            timeout=120.0,
        )

    # -- images -----------------------------------------------------------------------------------------

    async def inspect_image(self, ref: str) -> ImageInfo:
        data = (await self.request("GET", f"/images/{_image_ref(ref)}/json")).json()
        return ImageInfo(
            id=data["Id"],
            repo_tags=tuple(data.get("RepoTags") or ()),
            created=parse_time(data.get("Created")),
            size=int(data.get("Size") or 0),
            labels=_labels((data.get("Config") or {}).get("Labels")),
        )

    async def image_exists(self, ref: str) -> bool:
        try:
            await self.inspect_image(ref)
        except NotFound:
            return False
        return True

    async def list_images(
        self,
        *,
        reference: str | None = None,
        labels: Mapping[str, str | None] | Iterable[str] | None = None,
        dangling: bool | None = None,
    ) -> list[ImageSummary]:
        """Local images; ``reference`` is the engine's filter (``"kohakuriver-snapshot/vps-12"`` or with a
        ``*`` pattern), matching every tag of that repository."""
        filters = _filters(
            reference=[reference] if reference else None,
            label=_label_filter(labels),
            dangling=None if dangling is None else [str(dangling).lower()],
        )
        data = (await self.request("GET", "/images/json", params={"filters": filters})).json()
        return [
            ImageSummary(
                id=item["Id"],
                repo_tags=tuple(t for t in item.get("RepoTags") or () if t != "<none>:<none>"),
                created=datetime.fromtimestamp(int(item.get("Created") or 0), UTC),
                size=int(item.get("Size") or 0),
                labels=_labels(item.get("Labels")),
            )
            for item in data
        ]

    async def remove_image(self, ref: str, *, force: bool = False, prune: bool = True) -> None:
        """Untag (and delete when unused) an image. ``Conflict`` if a container uses it and not ``force``."""
        await self.request(
            "DELETE",
            f"/images/{_image_ref(ref)}",
            params={"force": force, "noprune": not prune},
            timeout=REMOVE_TIMEOUT,
        )

    async def tag_image(self, ref: str, repo: str, tag: str = "latest") -> None:
        await self.request("POST", f"/images/{_image_ref(ref)}/tag", params={"repo": repo, "tag": tag})

    async def pull_image(
        self,
        ref: str,
        *,
        progress: ProgressCallback | None = None,
        registry_auth: Mapping[str, str] | None = None,
        platform: str | None = None,
    ) -> ImageInfo:
        """Pull from a registry, handing each JSON progress event to ``progress`` (sync or async).

        Errors the registry reports mid-stream raise ``DockerError``. Inactivity timeout only.
        """
        name, tag = split_image_ref(ref)
        headers = {}
        if registry_auth:
            headers["X-Registry-Auth"] = base64.urlsafe_b64encode(
                json.dumps(dict(registry_auth)).encode()
            ).decode()
        params = {"fromImage": name, "tag": tag or None, "platform": platform}
        timeout = httpx.Timeout(self.timeout, connect=5.0, read=STREAM_IDLE_TIMEOUT)
        async with self._stream(
            "POST", "/images/create", params=params, headers=headers, timeout=timeout
        ) as resp:
            async for _event in self._json_events(resp, progress):
                pass
        return await self.inspect_image(ref if "@" in ref or tag == "" else f"{name}:{tag}")

    async def load_image(
        self, tar_path: str | os.PathLike[str], *, progress: ProgressCallback | None = None
    ) -> list[str]:
        """``docker load`` a tarball streamed from disk; return the loaded references (or image ids)."""

        async def body() -> AsyncIterator[bytes]:
            async with await trio.open_file(tar_path, "rb") as f:
                while chunk := await f.read(_CHUNK):
                    yield chunk

        # Fail early and clearly on a missing file rather than from inside the upload.
        if not await trio.Path(tar_path).is_file():
            raise FileNotFoundError(f"image tarball {tar_path} does not exist")
        loaded: list[str] = []
        timeout = httpx.Timeout(
            self.timeout, connect=5.0, read=STREAM_IDLE_TIMEOUT, write=STREAM_IDLE_TIMEOUT
        )
        async with self._stream(
            "POST",
            "/images/load",
            params={"quiet": False},
            content=body(),
            headers={"Content-Type": "application/x-tar"},
            timeout=timeout,
        ) as resp:
            async for event in self._json_events(resp, progress):
                text = str(event.get("stream") or "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if text.startswith(prefix):
                        loaded.append(text[len(prefix) :].strip())
        return loaded

    async def save_image(self, refs: str | Sequence[str], dest: str | os.PathLike[str]) -> int:
        """Write a ``docker save`` tarball of ``refs`` to ``dest``; return its size.

        The file appears atomically (written to ``dest.part``, then renamed), so a reader on shared storage
        never loads a half-written tarball.
        """
        names = [refs] if isinstance(refs, str) else list(refs)
        for name in names:
            _image_ref(name)
        part = trio.Path(f"{os.fspath(dest)}.part")
        size = 0
        timeout = httpx.Timeout(self.timeout, connect=5.0, read=STREAM_IDLE_TIMEOUT)
        try:
            async with (
                self._stream(
                    "GET", "/images/get", params=[("names", n) for n in names], timeout=timeout
                ) as resp,
                await trio.open_file(part, "wb") as f,
            ):
                async for data in resp.aiter_bytes(_CHUNK):
                    await f.write(data)
                    size += len(data)
            await part.rename(dest)
        except BaseException:
            with trio.CancelScope(shield=True):
                await part.unlink(missing_ok=True)
            raise
        return size

    async def commit(
        self,
        container: str,
        repo: str,
        tag: str = "latest",
        *,
        message: str | None = None,
        author: str | None = None,
        pause: bool = True,
        changes: Sequence[str] = (),
    ) -> str:
        """Snapshot a container's filesystem as ``repo:tag``; return the new image id.

        ``pause`` freezes the container during the commit so the snapshot is consistent.
        """
        params: list[tuple[str, Any]] = [
            ("container", container),
            ("repo", repo),
            ("tag", tag),
            ("pause", "true" if pause else "false"),
        ]
        if message is not None:
            params.append(("comment", message))
        if author is not None:
            params.append(("author", author))
        params.extend(("changes", c) for c in changes)
        container_ref(container)
        _image_ref(f"{repo}:{tag}")
        resp = await self.request("POST", "/commit", params=params, json_body={}, timeout=COMMIT_TIMEOUT)
        return resp.json()["Id"]
