"""Terminals end to end: real `kr host` / `kr runner` processes, a busybox task container, and the real `kr`
CLI: `kr terminal exec` (exit codes, output, stdin from a pipe) and an interactive `kr connect` driven
through a pseudo-terminal (typing, window resize, exit status, the local terminal restored).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import select
import struct
import termios
import time

import pytest

from .cluster import KR, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.docker]


@pytest.fixture(scope="module")
def term_cluster(tmp_path_factory, test_image):
    c = Cluster(tmp_path_factory.mktemp("terminal"))
    try:
        c.start_host()
        c.add_runner(0)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def users(term_cluster) -> dict[str, str]:
    return {
        name: term_cluster.api("POST", "/api/auth/users", json={"username": f"term-{name}", "role": role})[
            "token"
        ]
        for name, role in (("alice", "user"), ("bob", "user"), ("vera", "viewer"))
    }


@pytest.fixture(scope="module")
def task_id(term_cluster, users) -> str:
    # -c 0: no core reserved (a 2-core test machine runs other tests beside).
    out = term_cluster.kr(
        "task", "submit", "-c", "0", "--", "sleep", "900", token=users["alice"]
    ).stdout.split()
    assert len(out) == 1, out
    term_cluster.wait_status(out[0], "running")
    return out[0]


def test_terminal_exec_exit_codes_and_output(term_cluster, users, task_id):
    alice = users["alice"]
    proc = term_cluster.kr(
        "terminal",
        "exec",
        task_id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
        token=alice,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")

    proc = term_cluster.kr("terminal", "exec", task_id, "--", "true", token=alice, check=False)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")

    proc = term_cluster.kr("terminal", "exec", task_id, "--", "no-such-command", token=alice, check=False)
    assert proc.returncode == 127 and "no-such-command" in proc.stderr and proc.stdout == ""

    # Arguments are an argv: nothing is interpreted by a shell on the way.
    proc = term_cluster.kr("terminal", "exec", task_id, "--", "echo", "a b", "$HOME;", "`x`", token=alice)
    assert proc.stdout == "a b $HOME; `x`\n"

    # Stdin from a pipe reaches the command, and its end is the command's EOF.
    proc = term_cluster.kr("terminal", "exec", task_id, "--", "wc", "-c", token=alice, input="x" * 100000)
    assert proc.stdout.strip() == "100000"

    # The admin (operator or admin) may reach any task.
    assert term_cluster.kr("terminal", "exec", task_id, "--", "true").returncode == 0


def test_refusals_have_clear_messages_and_exit_codes(term_cluster, users, task_id):
    for who in ("bob", "vera"):  # another user, a viewer: the task does not exist for them
        proc = term_cluster.kr("terminal", "exec", task_id, "--", "true", token=users[who], check=False)
        assert proc.returncode == 3 and f"task {task_id} not found" in proc.stderr, proc.stderr
        proc = term_cluster.kr("connect", task_id, token=users[who], check=False, input="echo hi\n")
        assert proc.returncode == 3 and "not found" in proc.stderr and "hi" not in proc.stdout

    proc = term_cluster.kr("terminal", "exec", "123456", "--", "true", token=users["alice"], check=False)
    assert proc.returncode == 3 and "not found" in proc.stderr

    proc = term_cluster.kr("terminal", "exec", task_id, "--", "true", token="krt_wrong", check=False)
    assert proc.returncode == 4 and "401" in proc.stderr

    proc = term_cluster.kr("terminal", "exec", "abc", "--", "true", check=False)
    assert proc.returncode == 2


def test_connect_without_a_terminal_reads_a_script_from_stdin(term_cluster, users, task_id):
    proc = term_cluster.kr(
        "connect", task_id, token=users["alice"], check=False, input="echo from-pipe\nexit 4\n"
    )
    assert (proc.returncode, proc.stdout) == (4, "from-pipe\n")


# -- kr connect through a pseudo-terminal ----------------------------------------------------------------


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Pty:
    """`kr connect` as a child whose controlling terminal is a pty we hold the master of."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int, cols: int) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its stdin/stdout/stderr and controlling terminal
            try:
                set_size(0, rows, cols)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.seen = bytearray()

    def expect(self, needle: bytes, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not seen; got {bytes(self.seen)!r}"
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                assert data, f"the terminal closed before {needle!r}; got {bytes(self.seen)!r}"
                self.seen += data

    def type(self, text: bytes) -> None:
        os.write(self.fd, text)

    def wait(self, timeout: float = 15) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            with_data, _, _ = select.select([self.fd], [], [], 0.05)
            if with_data:
                with contextlib.suppress(OSError):
                    self.seen += os.read(self.fd, 65536)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"kr connect did not exit; output {bytes(self.seen)!r}")

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)


def test_connect_interactive_through_a_pty(term_cluster, users, task_id):
    env = dict(term_cluster.env, KOHAKURIVER_TOKEN=users["alice"], TERM="xterm")
    before = termios.tcgetattr(0) if os.isatty(0) else None
    term = Pty([KR, "connect", task_id], env, rows=30, cols=90)
    try:
        term.expect(b"# ")  # the shell's prompt
        term.type(b"stty size; echo $TERM\n")
        term.expect(b"30 90\r\nxterm\r\n")
        # Raw mode while the session runs: the local line discipline neither echoes nor edits.
        assert not termios.tcgetattr(term.fd)[3] & (termios.ICANON | termios.ECHO)

        set_size(term.fd, 41, 123)  # the kernel sends kr SIGWINCH; kr sends the new size on
        deadline = time.monotonic() + 10
        while b"41 123" not in term.seen:
            assert time.monotonic() < deadline, bytes(term.seen)
            term.type(b"stty size\n")
            with contextlib.suppress(AssertionError):
                term.expect(b"41 123", timeout=1)

        # Ctrl-C is a key for the remote side, not a signal for kr.
        term.type(b"sleep 30\n")
        time.sleep(0.3)
        term.type(b"\x03")
        term.type(b"echo hi; exit 5\n")
        term.expect(b"\nhi\r\n")
        assert term.wait() == 5
        # The local terminal is back in its own mode.
        lflag = termios.tcgetattr(term.fd)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO
    finally:
        term.close()
    if before is not None:
        assert termios.tcgetattr(0) == before


def test_connect_restores_the_terminal_on_sigterm(term_cluster, users, task_id):
    env = dict(term_cluster.env, KOHAKURIVER_TOKEN=users["alice"])
    term = Pty([KR, "connect", task_id], env, rows=24, cols=80)
    try:
        term.type(b"echo ready; sleep 4322\n")
        term.expect(b"\nready\r\n")
        os.kill(term.pid, 15)
        assert term.wait() == 128 + 15
        lflag = termios.tcgetattr(term.fd)[3]
        assert lflag & termios.ICANON and lflag & termios.ECHO
    finally:
        term.close()

    # The remote shell and its job were hung up, as after a dropped SSH session.
    def remote_processes() -> str:
        return term_cluster.kr("terminal", "exec", task_id, "--", "ps", "-o", "args").stdout

    deadline = time.monotonic() + 10
    while "sleep 4322" in remote_processes():
        assert time.monotonic() < deadline, remote_processes()
        time.sleep(0.2)


def test_host_refuses_a_bad_start_request_itself(term_cluster, users, task_id):
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    async def attempt() -> tuple[str, int]:
        url = term_cluster.url.replace("http://", "ws://") + f"/ws/terminal/{task_id}"
        headers = [(b"Authorization", f"Bearer {users['alice']}".encode())]
        with trio.fail_after(10):
            async with open_websocket_url(url, extra_headers=headers) as ws:
                await ws.send_message('{"tty": false, "command": "sh -c reboot"}')
                answer = await ws.get_message()
                try:
                    await ws.get_message()
                except ConnectionClosed as exc:
                    return answer, exc.reason.code
        raise AssertionError("the host did not close")

    answer, code = trio.run(attempt)
    assert code == 1008 and "command" in answer and answer.startswith('{"error"')
