"""The ``kr`` / ``kohakuriver`` console entry point.

Everything goes to the click CLI (``main.py``, which imports a command's module only when it runs) except
two calls that must start fast and are served with the standard library before click is imported, each
handing back (None) anything it does not serve:

- ``kr ssh proxy-command`` in the form ``kr ssh config`` generates, which OpenSSH runs once per connection
  (``proxy_command_fast``);
- ``kr ssh TASK_ID [options] [-- COMMAND]`` (and ``kr ssh connect TASK_ID ...``), which opens the tunnel
  itself and gives ssh the connected socket (``ssh_fast``).
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
    elif argv[:1] == ["ssh"] and len(argv) > 1:
        from .ssh_fast import try_run as try_ssh

        code = try_ssh(argv[2:] if argv[1] == "connect" else argv[1:])
        if code is not None:
            sys.exit(code)
    from .main import main as cli_main

    cli_main()
