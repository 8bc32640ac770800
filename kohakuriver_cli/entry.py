"""The ``kr`` / ``kohakuriver`` console entry point.

Everything goes to the click CLI (``main.py``, which imports a command's module only when it runs) except
the calls that must start fast and are served with the standard library before click is imported, each
handing back (None) anything it does not serve:

- ``kr ssh proxy-command`` in the form ``kr ssh config`` generates, which OpenSSH runs once per connection
  (``proxy_command_fast``);
- ``kr ssh TASK_ID [options] [-- COMMAND]`` (and ``kr ssh connect TASK_ID ...``), which opens the tunnel
  itself and gives ssh the connected socket (``ssh_fast``);
- ``kr task submit [OPTIONS] [--] COMMAND...`` in its common forms, which posts the task before click loads
  (the models never do: the host checks the spec), so what loads after the request overlaps the task's
  start instead of preceding it (``task_submit_fast``);
- ``kr --version`` alone, which scripts and installers run to check what they have: click's import alone
  is 45 ms of its 70 (the answer is click's own ``version_option`` text).

A fast path that served the call ends the process with ``os._exit`` once stdout and stderr are flushed: it
holds nothing that needs the interpreter's teardown (no atexit work, no buffered files of its own), and that
teardown costs 5-10 ms after ssh has already finished, on the time of every ``kr ssh`` (and after the task's
output, on every ``kr task submit --wait``).
"""

from __future__ import annotations

import sys


def _done(code: int) -> None:
    import contextlib
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing more can be said on it
            stream.flush()
    os._exit(code)


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        import os

        from kohakuriver_proto import __version__

        print(f"{os.path.basename(sys.argv[0]) or 'kr'}, version {__version__}")
        _done(0)
    if argv[:2] == ["ssh", "proxy-command"]:
        from .proxy_command_fast import try_run

        code = try_run(argv[2:])
        if code is not None:
            _done(code)
    elif argv[:1] == ["ssh"] and len(argv) > 1:
        from .ssh_fast import try_run as try_ssh

        code = try_ssh(argv[2:] if argv[1] == "connect" else argv[1:])
        if code is not None:
            _done(code)
    elif argv[:2] == ["task", "submit"]:
        from .task_submit_fast import try_run as try_submit

        code = try_submit(argv[2:])
        if code is not None:
            _done(code)
    from .main import main as cli_main

    cli_main()
