"""Error types of the protocol library.

Like h11, the error says *who* broke the protocol: ``LocalProtocolError`` when the caller asked the machine
to do something illegal, ``RemoteProtocolError`` when bytes or events from the peer were illegal. Both derive
from ``ProtocolError`` so that "anything this library raises about bad input" is one ``except`` clause.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class of every error the protocol library raises about bad input or misuse."""


class LocalProtocolError(ProtocolError):
    """Our side tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class ValidationError(ProtocolError):
    """A model or setting failed validation; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
