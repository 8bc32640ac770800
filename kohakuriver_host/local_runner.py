"""A runner in the host's own process (``kr up``), and how forward sessions reach it without a socket.

On the plain-TCP path the host relays a forward session's bytes verbatim (``forward_splice``): the client's
frames are exactly what the runner's forward route reads, and the runner's are exactly what the client
reads. When the runner lives in the same process, that relay is a loopback TCP connection whose two ends the
process serves itself: every forwarded byte is spliced out of one socket and read again from another, one
more hop of kernel TCP work on the one core that ``kr up`` runs on (``bench/tunnel.py`` measures both).
Instead the host hands the client's connection, after its own checks and ``101``, to the runner's forward
route directly: the client sees the same bytes (``CONNECTED`` or ``Error:`` + close, then the session).

The runner's route normally checks the cluster token; here the caller is the host itself, which already
authenticated the user and admitted the session (``api_forward.admit``). Only a node whose registration
names this very runner (hostname and URL) is served this way; any other node, including one registering the
same hostname from elsewhere, is reached over the network as usual.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

__all__ = ["LocalForward", "LocalRunner"]

#: ``(stream, task ref, port text, proto, early bytes, answer_by)``: serve one forward session on ``stream``
#: (the client's connection, WebSocket already accepted; ``early``: the frames that came with the request)
#: and answer ``CONNECTED`` or ``Error:`` before ``answer_by`` (``trio.current_time()``).
LocalForward = Callable[[trio.SocketStream, str, str, str, bytes, float], Awaitable[None]]


@attrs.frozen
class LocalRunner:
    """The runner that ``kr up`` started next to this host."""

    node: str  # its hostname, as it registers
    url: str  # its URL, as it registers
    forward: LocalForward

    def serves(self, node: str, node_url: str) -> bool:
        """Is the registered node ``node`` at ``node_url`` this runner?"""
        return node == self.node and node_url.rstrip("/") == self.url.rstrip("/")
