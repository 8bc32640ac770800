"""kohakuriver_proto: the sans-IO protocol core of KohakuRiver.

Nothing in this package performs I/O, reads a clock or draws randomness: callers feed bytes and the current
time in, and get bytes and events out. Host, runner, CLI and the Rust client's tests all bind to it.
"""

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, ValidationError

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError", "ValidationError"]
