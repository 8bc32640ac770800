"""``kr ssh ID`` loads almost nothing before it starts ssh, so ``ssh_fast`` answers a few questions with
``os`` alone that other modules answer with ``pathlib``, ``re``, ``shlex`` and ``urllib.parse``: where the
kohakuriver home is, whether the VPS's host key is pinned (and the options that check it), the host name of
the host URL, shell quoting, the user name check. These tests hold each answer equal to the module it stands
in for, and check what is loaded at the moment ssh is started (a real ``kr ssh`` in a fresh interpreter)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kohakuriver_cli import known_hosts, ssh_fast
from kohakuriver_net.paths import kohakuriver_home

KEY = "ssh-ed25519 " + "A" * 68


@pytest.mark.parametrize("override", [None, "", "/srv/kr home", "~/kr", "/a/b/"])
def test_home_is_kohakuriver_home(monkeypatch, override):
    if override is None:
        monkeypatch.delenv("KOHAKURIVER_HOME", raising=False)
    else:
        monkeypatch.setenv("KOHAKURIVER_HOME", override)
    assert Path(ssh_fast._home()) == kohakuriver_home()


@pytest.mark.parametrize(
    "content",
    [
        None,  # no file
        "",
        f"kohakuriver-7 {KEY}\n",
        f"kohakuriver-70 {KEY}\nkohakuriver-8 {KEY}\n",  # 7 is not 70
        f"# kohakuriver-7 {KEY}\n",
        f"|1|hashed= {KEY}\n@cert-authority kohakuriver-7 {KEY}\n",
        f"other,kohakuriver-7 {KEY} comment\n",
        "kohakuriver-7 ssh-ed25519\n",  # malformed: no key
        f"\n\n  kohakuriver-7   {KEY}  \r\n",
    ],
)
@pytest.mark.parametrize("home_name", ["krhome", "a dir 100%", 'say "hi"'])
def test_pinned_options_are_known_hosts(tmp_path, monkeypatch, content, home_name):
    home = tmp_path / home_name
    home.mkdir()
    monkeypatch.setenv("KOHAKURIVER_HOME", str(home))
    if content is not None:
        (home / "known_hosts").write_text(content)
    for alias in ("kohakuriver-7", "kohakuriver-8", "kohakuriver-70"):
        assert ssh_fast.pinned_options(alias) == known_hosts.pinned_options(alias), (alias, content)


URLS = [
    "http://127.0.0.1:8000",
    "https://H.Lab:8000/x?y#z",
    "http://user:pw@host:1/",
    "http://[::1]:8000",
    "http://[fe80::1%25eth0]:80",
    "http://host",
    "http://host:",
    "http://:80",
    "http://a@b@c:1",
    "http://host/path:with@at",
    "HTTP://X",
    "http://host?q=a:b",
    "http://host#frag@x",
]


@pytest.mark.parametrize("url", URLS)
def test_hostname_is_urlsplits(url):
    assert ssh_fast._hostname(url) == urlsplit(url).hostname


@pytest.mark.parametrize("url", ["ftp://x", "host:8000", "http://[::1", "http://::1]", "file:///x"])
def test_hostname_refuses_what_the_click_command_explains(url):
    assert ssh_fast._hostname(url) is None


@given(st.lists(st.text(max_size=12), max_size=5))
def test_shell_join_is_shlex_join(words):
    assert ssh_fast._shell_join(words) == shlex.join(words)


@given(st.text(max_size=70))
def test_user_check_is_the_click_commands(user):
    assert ssh_fast._valid_user(user) == bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}", user))


def test_fdpass_options_name_the_binary_when_there_is_one():
    rust = ssh_fast.fdpass_options("/tmp/kr-ssh-x/s", "/opt/kr bin/tunnel-client")
    assert rust == [
        "-o", "ProxyCommand='/opt/kr bin/tunnel-client' --fdpass /tmp/kr-ssh-x/s", "-o", "ProxyUseFdpass=yes",
    ]  # fmt: skip
    python = ssh_fast.fdpass_options("/tmp/kr-ssh-x/s")
    assert shlex.split(python[1].removeprefix("ProxyCommand="))[:3] == [sys.executable, "-S", "-I"]


def test_proxy_ports_are_kept_per_host_url_in_plain_text(tmp_path, monkeypatch):
    monkeypatch.setenv("KOHAKURIVER_HOME", str(tmp_path / "home"))
    ssh_fast.remember_port("http://h:8000", 2222)
    ssh_fast.remember_port("http://other:8000", 2223)
    ssh_fast.remember_port("http://sp ace:8000", 2224)  # one line per URL: not kept
    path = tmp_path / "home" / ssh_fast.PORTS_FILE
    assert path.read_text() == "2222 http://h:8000\n2223 http://other:8000\n"
    assert ssh_fast.remembered_port("http://sp ace:8000") is None
    path.write_text("2222 http://h:8000\nnot a port line\n70000 http://x\n2225 http://other:8000\n")
    assert ssh_fast.remembered_port("http://other:8000") == 2225
    assert ssh_fast.remembered_port("http://x") is None
    ssh_fast.remember_port("http://h:8000", None)
    assert path.read_text() == "2225 http://other:8000\n"


def test_nothing_heavy_is_loaded_when_ssh_starts(tmp_path):
    """A real ``kr ssh ID -- true`` in a fresh interpreter, with the VPS's key pinned (ssh starts first): at
    the moment ``posix_spawn`` starts ssh, none of the modules the fast path avoids is loaded. The ssh is
    not really started (the spawn is replaced); the tunnel is never opened."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "known_hosts").write_text(f"kohakuriver-42 {KEY}\n")
    code = (
        "import os, sys\n"
        "from kohakuriver_cli import ssh_fast\n"
        "def spawn(path, argv, env, **kwargs):\n"
        "    if argv[1] == '--fdpass-probe':\n"  # a tunnel-client being probed: not ssh
        "        raise OSError('no probe here')\n"
        "    print(' '.join(sorted(sys.modules)))\n"
        "    print(argv[0])\n"
        "    os._exit(0)\n"
        "os.posix_spawn = spawn\n"
        "ssh_fast.try_run(['42', '--', 'true'])\n"
        "print('ssh was not started')\n"
    )
    env = {
        **os.environ,
        "KOHAKURIVER_HOME": str(home),
        "KOHAKURIVER_TUNNEL_CLIENT": "",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    modules, ssh = proc.stdout.splitlines()
    assert ssh.endswith("/ssh")
    avoided = {
        "re", "enum", "functools", "collections", "contextlib", "pathlib", "shlex", "json", "urllib.parse",
        "socket", "signal", "subprocess", "threading", "typing", "kohakuriver_proto", "kohakuriver_net.paths",
        "kohakuriver_cli.known_hosts", "kohakuriver_cli.ssh_keys", "kohakuriver_cli.credentials",
    }  # fmt: skip
    assert not avoided & set(modules.split())
