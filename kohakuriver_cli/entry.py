"""The ``kr`` / ``kohakuriver`` console entry point.

Everything goes to the click CLI (``main.py``) except ``kr ssh proxy-command`` in the form ``kr ssh``
generates, which OpenSSH runs once per connection and which must start fast: ``proxy_command_fast`` serves it
without importing the CLI (see its docstring), and hands back anything it does not serve.
"""

from __future__ import annotations

import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:2] == ["ssh", "proxy-command"]:
        from .proxy_command_fast import try_run

        code = try_run(argv[2:])
        if code is not None:
            sys.exit(code)
    from .main import main as cli_main

    cli_main()
