"""`kr init config` and `kr init service` through click's CliRunner, in temporary directories."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from kohakuriver_cli import init_cmd
from kohakuriver_cli.init_cmd import init
from kohakuriver_host.config import HOST_SCHEMA, load_host_config
from kohakuriver_runner.config import RUNNER_SCHEMA, load_runner_config


@click.group()
def cli() -> None:
    pass


cli.add_command(init)

KR = Path(sys.executable).absolute().parent / "kr"


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "krhome"
    monkeypatch.setenv("KOHAKURIVER_HOME", str(path))
    return path


def run(*args: str):
    return CliRunner().invoke(cli, ["init", *args])


def assert_one_line_error(result):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# init config


def test_config_writes_both_templates_to_home(home):
    result = run("config", "--host", "--runner")
    assert result.exit_code == 0, result.output
    host_file, runner_file = home / "host_config.py", home / "runner_config.py"
    for path in (host_file, runner_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert f"wrote {path}" in result.stdout
    assert load_host_config(None) == HOST_SCHEMA.defaults()
    assert load_runner_config(None) == RUNNER_SCHEMA.defaults()
    assert "`kr host`" in result.stdout


def test_config_output_dir_and_single_role(tmp_path, home):
    out = tmp_path / "out" / "nested"
    result = run("config", "--runner", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "runner_config.py").is_file() and not (out / "host_config.py").exists()
    assert f"kr runner --config {out / 'runner_config.py'}" in result.stdout
    assert load_runner_config(out / "runner_config.py") == RUNNER_SCHEMA.defaults()


def test_config_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "host_config.py").write_text("HOST_PORT = 1234\n")
    result = run("config", "--host", "--runner", "-o", str(tmp_path))
    line = assert_one_line_error(result)
    assert "host_config.py already exists; use --force" in line
    assert (tmp_path / "host_config.py").read_text() == "HOST_PORT = 1234\n"
    assert not (tmp_path / "runner_config.py").exists()  # nothing is written when one target is refused

    result = run("config", "--host", "--runner", "-o", str(tmp_path), "--force")
    assert result.exit_code == 0, result.output
    assert load_host_config(tmp_path / "host_config.py") == HOST_SCHEMA.defaults()
    assert stat.S_IMODE((tmp_path / "host_config.py").stat().st_mode) == 0o600


def test_config_needs_a_role(tmp_path):
    result = run("config", "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "--host, --runner, or both" in result.stderr


def test_config_output_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run("config", "--host", "-o", str(blocker))
    assert result.exit_code != 0


# ---------------------------------------------------------------------------------------------------------
# init service


def make_configs(home: Path) -> tuple[Path, Path]:
    assert run("config", "--host", "--runner").exit_code == 0
    return home / "host_config.py", home / "runner_config.py"


def test_service_all_to_output_dir(tmp_path, home):
    host_cfg, runner_cfg = make_configs(home)
    out = tmp_path / "units"
    result = run("service", "--all", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    host_unit = (out / "kohakuriver-host.service").read_text()
    runner_unit = (out / "kohakuriver-runner.service").read_text()

    assert f"ExecStart={KR} host --config {host_cfg}\n" in host_unit
    assert f"ExecStart={KR} runner --config {runner_cfg}\n" in runner_unit
    for unit in (host_unit, runner_unit):
        assert "Restart=on-failure\n" in unit
        assert "KillSignal=SIGTERM\n" in unit
        assert "TimeoutStopSec=30\n" in unit
        assert f"WorkingDirectory={home}\n" in unit
        assert "[Install]\nWantedBy=multi-user.target\n" in unit
        assert f"KOHAKURIVER_HOME={home}" in unit
    assert "After=network-online.target docker.service\n" in runner_unit
    assert "Wants=network-online.target docker.service\n" in runner_unit
    assert "docker.service" not in host_unit
    assert "KillMode=process\n" in runner_unit
    assert "install with: sudo cp" in result.stdout


def test_service_prints_by_default(home):
    make_configs(home)
    result = run("service", "--runner")
    assert result.exit_code == 0, result.output
    assert "# ---- kohakuriver-runner.service ----" in result.stdout
    assert "kohakuriver-host.service" not in result.stdout
    assert f"ExecStart={KR} runner --config" in result.stdout


def test_service_explicit_paths_and_quoting(tmp_path, home):
    cfg = tmp_path / "my configs" / "100%host.py"
    cfg.parent.mkdir()
    cfg.write_text("")
    work = tmp_path / "work dir"
    result = run("service", "--host", "--host-config", str(cfg), "--working-dir", str(work))
    assert result.exit_code == 0, result.output
    quoted = '"' + str(cfg).replace("%", "%%") + '"'
    assert f"ExecStart={KR} host --config {quoted}\n" in result.stdout
    assert f"WorkingDirectory={work}\n" in result.stdout


def test_service_warns_about_a_missing_config(tmp_path, home):
    result = run("service", "--host", "-o", str(tmp_path))
    assert result.exit_code == 0
    assert "warning:" in result.stderr and "kr init config --host" in result.stderr


def test_service_needs_a_role():
    result = run("service")
    assert result.exit_code == 2
    assert "--host, --runner, or --all" in result.stderr


def test_service_python_without_kr(tmp_path, home):
    python = tmp_path / "bin" / "python"
    python.parent.mkdir()
    python.write_text("")
    line = assert_one_line_error(run("service", "--host", "--python-path", str(python)))
    assert "no `kr` next to" in line


def test_service_python_path_selects_the_venv(tmp_path, home):
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("")
    (venv_bin / "kr").write_text("")
    result = run("service", "--host", "--python-path", str(venv_bin / "python"))
    assert result.exit_code == 0, result.output
    assert f"ExecStart={venv_bin / 'kr'} host --config" in result.stdout
    assert f"Environment=PATH={venv_bin}:" in result.stdout


def test_install_copies_units_and_reloads(tmp_path, home, monkeypatch):
    make_configs(home)
    systemd = tmp_path / "systemd"
    systemd.mkdir()
    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(init_cmd, "SYSTEMD_DIR", systemd)
    monkeypatch.setattr(init_cmd.os, "geteuid", lambda: 0)
    monkeypatch.setattr(init_cmd.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(init_cmd.subprocess, "run", fake_run)
    result = run("service", "--all", "--install")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in systemd.iterdir()) == [
        "kohakuriver-host.service",
        "kohakuriver-runner.service",
    ]
    assert stat.S_IMODE((systemd / "kohakuriver-host.service").stat().st_mode) == 0o644
    assert [argv for argv, _ in calls] == [["/usr/bin/systemctl", "daemon-reload"]]
    assert "shell" not in calls[0][1]
    assert "systemctl enable --now kohakuriver-host.service kohakuriver-runner.service" in result.stdout


def test_install_reports_a_failing_daemon_reload(tmp_path, home, monkeypatch):
    make_configs(home)
    systemd = tmp_path / "systemd"
    systemd.mkdir()
    monkeypatch.setattr(init_cmd, "SYSTEMD_DIR", systemd)
    monkeypatch.setattr(init_cmd.os, "geteuid", lambda: 0)
    monkeypatch.setattr(init_cmd.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(
        init_cmd.subprocess,
        "run",
        lambda argv, **kw: subprocess.CompletedProcess(argv, 1, "", "Failed to connect to bus\n"),
    )
    line = assert_one_line_error(run("service", "--host", "--install"))
    assert "daemon-reload failed: Failed to connect to bus" in line


def test_install_needs_root(home, monkeypatch):
    make_configs(home)
    monkeypatch.setattr(init_cmd.os, "geteuid", lambda: 1000)
    line = assert_one_line_error(run("service", "--host", "--install"))
    assert "needs root" in line


def test_install_needs_the_config_file(tmp_path, home, monkeypatch):
    monkeypatch.setattr(init_cmd, "SYSTEMD_DIR", tmp_path)
    monkeypatch.setattr(init_cmd.os, "geteuid", lambda: 0)
    line = assert_one_line_error(run("service", "--runner", "--install"))
    assert "does not exist" in line and "kr init config --runner" in line
    assert list(tmp_path.glob("*.service")) == []


def test_systemd_arg_quoting():
    assert init_cmd._systemd_arg("/usr/bin/kr") == "/usr/bin/kr"
    assert init_cmd._systemd_arg("/a b/c") == '"/a b/c"'
    assert init_cmd._systemd_arg('/a"b') == '"/a\\"b"'
    assert init_cmd._systemd_arg("/x/$HOME/%h") == "/x/$$HOME/%%h"
    with pytest.raises(click.ClickException):
        init_cmd._systemd_arg("/a\nb")
