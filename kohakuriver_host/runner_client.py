"""Host -> runner calls: one ``httpx.AsyncClient`` with the cluster token and short timeouts.

A runner that does not answer must never stall the caller for long: dispatch, kill, pause and resume wait
at most a few seconds (a node that is really gone is found by the liveness loop). Only a followed log
stream has no read timeout, because a quiet task may print nothing for hours.

Failures are two exceptions the callers branch on:

- ``RunnerUnavailable``: the runner could not be reached, timed out or answered 5xx (retry later, or 503).
- ``RunnerRefused``: the runner answered 4xx: it understood and said no (do not retry the same request).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from kohakuriver_proto.converter import dumps
from kohakuriver_proto.models import ExecuteRequest

CONNECT_TIMEOUT = 3.0
REQUEST_TIMEOUT = 10.0
MAX_ERROR_TEXT = 500
#: VPS calls that wait for Docker: a stop may commit a snapshot first (``docker commit`` of a large
#: filesystem), a restart waits for the container's own shutdown. Bounded, but far above REQUEST_TIMEOUT.
VPS_STOP_TIMEOUT = 300.0
VPS_RESTART_TIMEOUT = 90.0
SNAPSHOT_TIMEOUT = 300.0
#: Removing a VM instance stops its QEMU (if it still runs) and deletes its disk overlay.
VM_INSTANCE_DELETE_TIMEOUT = 60.0
#: Largest JSON answer accepted from a runner's snapshot endpoints.
MAX_JSON_ANSWER = 4 * 1024 * 1024


class RunnerError(Exception):
    def __init__(self, url: str, message: str) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.message = message


class RunnerUnavailable(RunnerError):
    """Not reachable, timed out, or a server-side error (``status``: the 5xx, None when it did not answer)."""

    def __init__(self, url: str, message: str, status: int | None = None) -> None:
        super().__init__(url, message)
        self.status = status


class RunnerRefused(RunnerError):
    """The runner answered with a 4xx status."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(url, message)
        self.status = status


def _error_text(response: httpx.Response) -> str:
    """The ``message`` of a JSON error body, else the start of the body, else the reason phrase."""
    text = ""
    try:
        body = json.loads(response.content)
        if isinstance(body, dict) and isinstance(body.get("message"), str):
            text = body["message"]
    except (ValueError, UnicodeDecodeError):
        text = response.content[:MAX_ERROR_TEXT].decode("utf-8", "replace").strip()
    return (text or response.reason_phrase or f"HTTP {response.status_code}")[:MAX_ERROR_TEXT]


def _check(url: str, response: httpx.Response) -> httpx.Response:
    if response.status_code >= 500:
        raise RunnerUnavailable(
            url, f"HTTP {response.status_code}: {_error_text(response)}", status=response.status_code
        )
    if response.status_code >= 400:
        raise RunnerRefused(url, response.status_code, _error_text(response))
    return response


def _json(response: httpx.Response) -> Any:
    """The JSON body of a runner's answer (None when empty); ``RunnerUnavailable`` when it is not JSON."""
    url = str(response.request.url)
    if len(response.content) > MAX_JSON_ANSWER:
        raise RunnerUnavailable(url, "the answer is too large")
    if not response.content.strip():
        return None
    try:
        return json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        raise RunnerUnavailable(url, "the answer is not JSON") from None


class RunnerClient:
    """Typed calls to runners. Create with the cluster token; ``aclose`` when the host stops."""

    def __init__(self, cluster_token: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {cluster_token}"},
            timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, url, **kwargs)
        except httpx.TimeoutException:
            raise RunnerUnavailable(url, "timed out") from None
        except httpx.HTTPError as exc:  # connection refused, DNS, TLS, protocol errors
            raise RunnerUnavailable(
                url, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ) from None
        return _check(url, response)

    async def execute(self, base_url: str, request: ExecuteRequest) -> None:
        await self._request(
            "POST",
            f"{base_url}/api/execute",
            content=dumps(request).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )

    async def control(self, base_url: str, action: str, task_id: int) -> None:
        """``kill``, ``pause`` or ``resume`` a task on its runner."""
        if action not in ("kill", "pause", "resume"):
            raise ValueError(f"unknown action {action!r}")
        await self._request("POST", f"{base_url}/api/{action}/{task_id}")

    async def vps_action(self, base_url: str, action: str, task_id: int) -> int:
        """``stop`` or ``restart`` a VPS; returns the runner's status code (200: done, 202: under way,
        it reports the outcome with a status update)."""
        timeouts = {"stop": VPS_STOP_TIMEOUT, "restart": VPS_RESTART_TIMEOUT}
        if action not in timeouts:
            raise ValueError(f"unknown VPS action {action!r}")
        timeout = httpx.Timeout(timeouts[action], connect=CONNECT_TIMEOUT)
        response = await self._request("POST", f"{base_url}/api/vps/{task_id}/{action}", timeout=timeout)
        return response.status_code

    async def list_snapshots(self, base_url: str, task_id: int) -> Any:
        return _json(await self._request("GET", f"{base_url}/api/vps/{task_id}/snapshots"))

    async def create_snapshot(self, base_url: str, task_id: int) -> Any:
        timeout = httpx.Timeout(SNAPSHOT_TIMEOUT, connect=CONNECT_TIMEOUT)
        response = await self._request("POST", f"{base_url}/api/vps/{task_id}/snapshots", timeout=timeout)
        return _json(response)

    async def delete_snapshot(self, base_url: str, task_id: int, timestamp: int) -> Any:
        timeout = httpx.Timeout(SNAPSHOT_TIMEOUT, connect=CONNECT_TIMEOUT)
        url = f"{base_url}/api/vps/{task_id}/snapshots/{timestamp}"
        return _json(await self._request("DELETE", url, timeout=timeout))

    async def restore_snapshot(self, base_url: str, task_id: int, timestamp: int) -> Any:
        """Restore a VPS to one of its snapshots (``{"message": ...}``); may take as long as taking one."""
        timeout = httpx.Timeout(SNAPSHOT_TIMEOUT, connect=CONNECT_TIMEOUT)
        url = f"{base_url}/api/vps/{task_id}/snapshots/{timestamp}/restore"
        return _json(await self._request("POST", url, timeout=timeout))

    async def vm_instances(self, base_url: str) -> Any:
        """The VM instance directories on the node (``{"instances": [...]}``)."""
        return _json(await self._request("GET", f"{base_url}/api/vm/instances"))

    async def delete_vm_instance(self, base_url: str, task_id: int) -> Any:
        timeout = httpx.Timeout(VM_INSTANCE_DELETE_TIMEOUT, connect=CONNECT_TIMEOUT)
        return _json(await self._request("DELETE", f"{base_url}/api/vm/instances/{task_id}", timeout=timeout))

    async def host_key(self, base_url: str, task_id: int) -> Any:
        """The VPS's public SSH host key (``{"host_key": "ssh-ed25519 ..."}``)."""
        return _json(await self._request("GET", f"{base_url}/api/vps/{task_id}/host-key"))

    async def open_logs(
        self, base_url: str, task_id: int, *, stream: str, lines: int | None, follow: bool
    ) -> httpx.Response:
        """Start ``GET /api/tasks/{id}/logs`` as a stream; the caller reads and must ``aclose()`` it."""
        params = {"stream": stream, "follow": "1" if follow else "0"}
        if lines is not None:
            params["lines"] = str(lines)
        url = f"{base_url}/api/tasks/{task_id}/logs"
        timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT, read=None if follow else 30.0)
        request = self._http.build_request("GET", url, params=params, timeout=timeout)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException:
            raise RunnerUnavailable(url, "timed out") from None
        except httpx.HTTPError as exc:
            raise RunnerUnavailable(url, f"{type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            try:
                await response.aread()
            except httpx.HTTPError:
                pass
            finally:
                await response.aclose()
            _check(url, response)
        return response
