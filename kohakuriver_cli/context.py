"""The click context object every user-facing command shares, and the command classes that keep errors tidy.

``CliContext`` holds what the global options said (``--host``, ``--token``, ``--json``) and builds the
``HostClient`` lazily, once per invocation, so commands that need no host (``kr logout``) never read the
credentials file for nothing. Tests put their own ``CliContext`` (with an ``httpx.MockTransport``) in
``CliRunner.invoke(..., obj=...)``; the group callback fills it in rather than replacing it.

Every ``kr`` imports this module (``main.py``), so it imports click and nothing heavy: no attrs, no httpx
(an httpx error can only come from a test's transport, and is recognised by its module), and the REST
client only when a command asks for it (``kr --help`` and ``--version`` never do).

``KrCommand``/``KrGroup`` turn anything unexpected a command raises into a one-line error (exit 1), so a
user never sees a traceback; ``KOHAKURIVER_DEBUG=1`` lets it through for a bug report.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    import httpx

    from .client import HostClient, Settings

F = TypeVar("F", bound=Callable[..., Any])
DEBUG_ENV = "KOHAKURIVER_DEBUG"


class CliContext:
    def __init__(
        self,
        host_option: str | None = None,
        token_option: str | None = None,
        json_output: bool = False,
        transport: httpx.BaseTransport | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.host_option = host_option
        self.token_option = token_option
        self.json_output = json_output
        #: An httpx transport for tests (``httpx.MockTransport``); None = the network.
        self.transport = transport
        self.timeout = timeout
        self._settings: Settings | None = None
        self._client: HostClient | None = None

    def settings(self) -> Settings:
        if self._settings is None:
            from .client import resolve_settings

            self._settings = resolve_settings(self.host_option, self.token_option, self.json_output)
        self._settings.json_output = self.json_output
        return self._settings

    def client(self) -> HostClient:
        if self._client is None:
            from .client import HostClient

            self._client = HostClient(self.settings(), timeout=self.timeout, transport=self.transport)
            click.get_current_context().call_on_close(self.close)
        return self._client

    def client_for(self, settings: Settings) -> HostClient:
        """A client for explicit settings (``kr login`` checks a token before saving it)."""
        from .client import HostClient

        client = HostClient(settings, timeout=self.timeout, transport=self.transport)
        click.get_current_context().call_on_close(client.close)
        return client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


pass_cli = click.make_pass_decorator(CliContext, ensure=True)


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(CliContext).json_output = True


def json_option(f: F) -> F:
    """``--json`` on a command: the same as the global ``kr --json``."""
    return click.option(
        "--json",
        "json_flag",
        is_flag=True,
        expose_value=False,
        callback=_set_json,
        help="Print the host's JSON answer (a stable format for scripts).",
    )(f)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class KrCommand(click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            raise  # handled by main(); nothing useful to say on a closed pipe
        except Exception as exc:
            from .client import CliError

            httpx = sys.modules.get("httpx")
            if httpx is not None and isinstance(exc, httpx.HTTPError) and not _debug():
                raise CliError(f"HTTP error: {exc or type(exc).__name__}") from None
            if _debug():
                raise
            raise CliError(
                f"unexpected error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)"
            ) from None


class KrGroup(click.Group):
    command_class = KrCommand
    group_class = type  # subgroups are KrGroups too
