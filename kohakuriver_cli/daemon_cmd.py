"""``kr host``, ``kr runner`` and ``kr up``: the daemons, run under trio until SIGTERM or Ctrl-C.

Each command loads and validates its configuration first (a bad setting is a one-line error naming it),
then runs the daemon in a nursery next to a signal watcher; a signal cancels the nursery so every service
shuts down in order and no thread or process is left behind.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable

import attrs
import click
import trio

from kohakuriver_net.paths import kohakuriver_home
from kohakuriver_proto.settings import SettingsError

log = logging.getLogger("kohakuriver")


def _setup_logging(level_name: str) -> None:
    level = {"full": 5, "debug": logging.DEBUG, "info": logging.INFO}.get(level_name, logging.WARNING)
    if level_name == "error":
        level = logging.ERROR
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # httpx logs every request at INFO, trio-websocket every message at DEBUG (on a forward session that is
    # thousands of lines a second, and measured as a third of the host's time): noise for a daemon, even
    # at "debug" or "full", which are for our own records. pyroute2 dumps every netlink message at DEBUG.
    for name in ("httpx", "httpcore", "hypercorn.access", "trio-websocket", "pyroute2"):
        logging.getLogger(name).setLevel(logging.WARNING)


async def _run_until_signal(main: Callable[[], Awaitable[None]]) -> None:
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

            async def run_main() -> None:
                await main()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run_main)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def _load(loader: Callable[[str | None], object], path: str | None) -> object:
    try:
        return loader(path)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _run(main: Callable[[], Awaitable[None]]) -> None:
    from kohakuriver_net.allocator import keep_freed_memory

    keep_freed_memory()  # the daemons relay forwarded bytes in 256 KiB frames
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(_run_until_signal, main)


@click.command("host")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="host_config.py to use.")
def host_cmd(config_path: str | None) -> None:
    """Run the host daemon (API, WebSockets, SSH proxy, scheduler)."""
    from kohakuriver_host.config import load_host_config
    from kohakuriver_host.daemon import serve_host

    config = _load(load_host_config, config_path)
    _setup_logging(config.LOG_LEVEL.value)
    _run(lambda: serve_host(config))


@click.command("runner")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="runner_config.py to use.")
def runner_cmd(config_path: str | None) -> None:
    """Run a runner daemon (executes tasks in Docker, hosts the tunnel server, heartbeats to the host)."""
    from kohakuriver_runner.config import load_runner_config
    from kohakuriver_runner.daemon import serve_runner

    config = _load(load_runner_config, config_path)
    _setup_logging(config.LOG_LEVEL.value)
    _run(lambda: serve_runner(config))


@click.command("up")
@click.option("--host-config", type=click.Path(dir_okay=False), help="host_config.py (default: built in).")
@click.option(
    "--runner-config", type=click.Path(dir_okay=False), help="runner_config.py (default: built in)."
)
def up_cmd(host_config: str | None, runner_config: str | None) -> None:
    """A whole single-machine cluster in one process: host and runner, state under ~/.kohakuriver."""
    from kohakuriver_host.config import host_config_from, load_host_config
    from kohakuriver_host.daemon import serve_host
    from kohakuriver_host.local_runner import LocalRunner
    from kohakuriver_runner.config import load_runner_config, runner_config_from
    from kohakuriver_runner.daemon import serve_runner

    home = kohakuriver_home()
    if host_config:
        hcfg = _load(load_host_config, host_config)
    else:
        hcfg = host_config_from(DB_FILE=str(home / "kohakuriver.db"), SHARED_DIR=str(home / "shared"))
    if runner_config:
        rcfg = _load(load_runner_config, runner_config)
    else:
        rcfg = runner_config_from(
            SHARED_DIR=str(home / "shared"), LOCAL_TEMP_DIR=str(home / "local"), HOST_PORT=hcfg.HOST_PORT
        )
    _setup_logging(hcfg.LOG_LEVEL.value)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handle = await nursery.start(serve_host, hcfg)
            runner = attrs.evolve(rcfg, CLUSTER_TOKEN=handle.cluster_token)
            started = await nursery.start(serve_runner, runner)
            # Forward sessions to this runner are handed over in memory, not relayed through loopback.
            handle.adopt_runner(LocalRunner(started.hostname, started.url, started.forward))
            click.echo(
                f"kohakuriver is up: host {handle.url}, runner {runner.hostname}. "
                "Try `kr task submit -- echo hi` in another terminal.",
                err=True,
            )

    _run(main)
