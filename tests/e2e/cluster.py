"""Real clusters for end-to-end tests: `kr host` and `kr runner` processes, the real CLI, real Docker.

Nothing here is a stand-in: the processes are the ones a user starts, configured through config files
written to a temporary KOHAKURIVER_HOME, on free loopback ports. Each cluster gets unique runner
hostnames so the containers of different test runs never mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
KR = str(Path(sys.executable).with_name("kr"))
TEST_IMAGE = "kohakuriver/busybox:latest"


def local_image(tag: str, script: str) -> str:
    """``tag``, built by ``scripts/images/<script>`` when Docker does not have it yet."""
    if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode != 0:
        subprocess.run(["bash", str(REPO / "scripts/images" / script)], check=True)
    return tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what, interval: float = 0.1):
    """Poll ``predicate`` until it is truthy; ``what`` (text, or a function giving it at the time of the
    failure, e.g. a daemon's log as it is then) names what was awaited."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except DaemonExited:
            raise
        except Exception as exc:  # the daemon may not listen yet
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(interval)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


def _write_config(path: Path, settings: dict[str, object]) -> None:
    path.write_text("".join(f"{key} = {value!r}\n" for key, value in settings.items()))


class DaemonExited(AssertionError):
    """A daemon a test waits for is gone: waiting longer cannot help."""


def raise_exited(daemon: Daemon) -> None:
    """A daemon that a test waits for has exited: say so at once, with its log, instead of timing out."""
    code = daemon.proc.returncode if daemon.proc is not None else None
    raise DaemonExited(f"{daemon.name} exited with {code} before answering\n{daemon.log()}")


class Daemon:
    """One daemon process with its log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log, start_new_session=True)
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"{self.name} did not stop within {timeout}s after {sig}\n{self.log()}"
            ) from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""


class Cluster:
    """A host and any number of runners, all real processes."""

    def __init__(self, root: Path, heartbeat: int = 1, timeout_factor: int = 3) -> None:
        self.root = root
        self.home = root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.host_port = free_port()
        self.ssh_port = free_port()
        self.url = f"http://127.0.0.1:{self.host_port}"
        self.tag = secrets.token_hex(3)
        self.env = dict(os.environ, KOHAKURIVER_HOME=str(self.home), KOHAKURIVER_HOST=self.url)
        self.env.pop("KOHAKURIVER_TOKEN", None)
        self.host_config = self.home / "host_config.py"
        _write_config(
            self.host_config,
            {
                "HOST_BIND_IP": "127.0.0.1",
                "HOST_PORT": self.host_port,
                "HOST_SSH_PROXY_PORT": self.ssh_port,
                "DB_FILE": str(self.home / "host.db"),
                "SHARED_DIR": str(root / "shared"),
                "HEARTBEAT_INTERVAL_SECONDS": heartbeat,
                "HEARTBEAT_TIMEOUT_FACTOR": timeout_factor,
                "CLEANUP_CHECK_INTERVAL_SECONDS": 1,
                "LOG_LEVEL": "debug",
            },
        )
        host_argv = [KR, "host", "--config", str(self.host_config)]
        self.host = Daemon("host", host_argv, self.env, root / "host.log")
        self.runners: dict[str, Daemon] = {}
        self.heartbeat = heartbeat
        self._token: str | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start_host(self) -> None:
        self.host.start()

        def answers() -> bool:
            if not self.host.alive():
                raise_exited(self.host)
            return httpx.get(f"{self.url}/api/health", timeout=1).status_code == 200

        wait_until(answers, 30, lambda: f"the host to answer\n{self.host.log()}")

    @property
    def admin_token(self) -> str:
        if self._token is None:
            creds = json.loads((self.home / "credentials.json").read_text())
            self._token = creds["token"]
        return self._token

    @property
    def cluster_token(self) -> str:
        return (self.home / "cluster_token").read_text().strip()

    def runner_name(self, index: int = 0) -> str:
        return f"kr-e2e-{self.tag}-{index}"

    def _runner_config(
        self, index: int, overrides: dict[str, object], joins: bool = True
    ) -> tuple[str, Path]:
        name = self.runner_name(index)
        port = free_port()
        config = self.home / f"runner_{index}.py"
        settings: dict[str, object] = {
            "RUNNER_HOSTNAME": name,
            "RUNNER_PORT": port,
            "RUNNER_URL": f"http://127.0.0.1:{port}",
            "HOST_ADDRESS": "127.0.0.1",
            "HOST_PORT": self.host_port,
            "SHARED_DIR": str(self.root / "shared"),
            "LOCAL_TEMP_DIR": str(self.root / f"local-{index}"),
            "HEARTBEAT_INTERVAL_SECONDS": self.heartbeat,
            "DEFAULT_IMAGE": TEST_IMAGE,
            "LOG_LEVEL": "debug",
        }
        if joins:  # a separate runner process joins with the host's cluster token (``kr up`` passes it)
            settings["CLUSTER_TOKEN"] = self.cluster_token
        settings.update(overrides)
        _write_config(config, settings)
        return name, config

    def add_runner(self, index: int = 0, **overrides: object) -> str:
        name, config = self._runner_config(index, overrides)
        daemon = Daemon(name, [KR, "runner", "--config", str(config)], self.env, self.root / f"{name}.log")
        self.runners[name] = daemon
        daemon.start()
        self.wait_node_online(name)
        return name

    def start_up(self, **overrides: object) -> str:
        """``kr up`` instead of ``kr host`` + ``kr runner``: both in one process (``self.host``, also listed
        as the runner); returns the runner's name once its node is online."""
        name, config = self._runner_config(0, overrides, joins=False)
        self.host = Daemon(
            "kr up",
            [KR, "up", "--host-config", str(self.host_config), "--runner-config", str(config)],
            self.env,
            self.root / "up.log",
        )
        self.start_host()
        self.runners[name] = self.host
        self.wait_node_online(name)
        return name

    def wait_node_online(self, name: str, timeout: float = 30) -> dict:
        def online():
            if not self.runners[name].alive():
                raise_exited(self.runners[name])
            node = self.api("GET", f"/api/nodes/{name}", check=False)
            return node if isinstance(node, dict) and node.get("status") == "online" else None

        return wait_until(online, timeout, lambda: f"runner {name} to be online\n{self.runners[name].log()}")

    def stop(self) -> None:
        errors = []
        for daemon in dict.fromkeys([*self.runners.values(), self.host]):  # ``kr up`` is both
            try:
                daemon.stop()
            except AssertionError as exc:
                errors.append(str(exc))
        for name in self.runners:
            _remove_containers(name)
        if errors:
            raise AssertionError("\n".join(errors))

    # -- talking to it --------------------------------------------------------------------------------------

    def api(self, method: str, path: str, *, token: str | None = None, check: bool = True, **kwargs):
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        r = httpx.request(method, f"{self.url}{path}", headers=headers, timeout=30, **kwargs)
        if check:
            assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        try:
            return r.json()
        except ValueError:
            return r.text

    def kr(self, *args: str, token: str | None = None, check: bool = True, timeout: float = 120,
           input: str | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        env = dict(self.env)
        if token:
            env["KOHAKURIVER_TOKEN"] = token
        proc = subprocess.run(
            [KR, *args], env=env, capture_output=True, text=True, timeout=timeout, input=input
        )
        if check:
            assert proc.returncode == 0, f"kr {args} -> {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc

    def task(self, task_id: str) -> dict:
        return self.api("GET", f"/api/status/{task_id}")

    def wait_status(self, task_id: str, statuses: set[str] | str, timeout: float = 60) -> dict:
        wanted = {statuses} if isinstance(statuses, str) else set(statuses)

        def reached():
            record = self.task(task_id)
            return record if record["status"] in wanted else None

        return wait_until(reached, timeout, f"task {task_id} to reach {wanted}: {self.task(task_id)}", 0.1)


def _remove_containers(runner_name: str) -> None:
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=kohakuriver.runner={runner_name}"],
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    if ids:
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)


@contextlib.contextmanager
def running_cluster(
    root: Path,
    runners: int = 1,
    *,
    heartbeat: int = 1,
    timeout_factor: int = 3,
    up: bool = False,
    **runner: object,
) -> Iterator[Cluster]:
    """A host and ``runners`` runners (``runner``: their config overrides) under ``root``; stopped with
    SIGTERM at the end (which must work), also when starting failed half way. ``up``: one ``kr up`` process
    (host and one runner) instead."""
    cluster = Cluster(root, heartbeat=heartbeat, timeout_factor=timeout_factor)
    try:
        if up:
            assert runners == 1, "kr up runs one runner"
            cluster.start_up(**runner)
        else:
            cluster.start_host()
            for index in range(runners):
                cluster.add_runner(index, **runner)
        yield cluster
    finally:
        cluster.stop()
