"""Drive kohakuriver_proto's ``Forwarder`` from plain stdlib sockets: one local TCP connection carried through
a KohakuRiver forward session (what ``kr forward`` does for each connection it accepts).

``link`` is a socket on which the session's WebSocket is already open: a client sent the HTTP upgrade for
``/ws/forward/{task_id}/{port}?proto=tcp`` and read the ``101`` answer (any HTTP client does that part; it is
left out here). Frames on it are encoded and parsed with ``kohakuriver_proto.ws_frames``. With a WebSocket
library instead, replace ``ClientWebSocket`` by that library's send/receive calls and keep the loop.

Everything protocol-shaped is decided by the sans-IO machine; this file only moves bytes: it reads the
sockets when the machine allows it (``send_credit``), writes what the machine returns (``SendFrame``), and
reports what it wrote (``delivered``), which is where flow-control credit comes from.

Run it as a script (``python forward_over_socket.py``) to watch it work: a fake server in a thread plays the
container side with ``TunnelClient`` and an in-memory echo service, and two megabytes go there and back.
Only the standard library and kohakuriver_proto (``pip install ./proto``) are needed.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time

from kohakuriver_proto.forwarder import (
    ConnectionClosed,
    ConnectionReady,
    DataReceived,
    Forwarder,
    RemoteEOF,
    SendFrame,
)
from kohakuriver_proto.frames import Proto
from kohakuriver_proto.session_opening import RefusalCode, Refused, Refusing, forward_answer, forward_refusal
from kohakuriver_proto.tunnel_client import (
    CloseConnection,
    CreditAvailable,
    OpenTcp,
    ShutdownWrite,
    TunnelClient,
    WriteData,
)
from kohakuriver_proto.ws_frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameReader,
    Ping,
    close_payload,
    frame_parts,
)

CHUNK = 64 * 1024
MAX_LINK_BACKLOG = 1 << 20  # stop reading the local socket while this much waits to go to the server
MAX_LOCAL_BACKLOG = 256 * 1024  # stop reading the WebSocket while this much waits for the local socket


class SessionRefused(Exception):
    """The server refused the session: ``refused.code`` says why, ``refused.exit_code`` what a CLI exits
    with, ``refused.retry_later`` whether to try again."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.reason)
        self.refused = refused


class ClientWebSocket:
    """The client end of an open WebSocket on a non-blocking socket: frames out (masked), messages in."""

    def __init__(self, sock: socket.socket, max_message: int = 16 << 20) -> None:
        self.sock = sock
        self.reader = FrameReader(masked=False, max_message=max_message)
        self.out = bytearray()  # encoded frames not yet accepted by the socket

    def send(self, opcode: int, payload: bytes | bytearray | memoryview) -> None:
        # RFC 6455: a client masks every frame with a fresh random key (the codec has no randomness itself).
        for part in frame_parts(opcode, payload, mask_key=os.urandom(4)):
            self.out += part

    def flush(self) -> None:
        if self.out:
            del self.out[: self.sock.send(self.out)]

    def receive(self) -> list:
        """What one read brought: messages (bytes, str) and control frames; None at the end means EOF."""
        with self.reader.writable(CHUNK) as view:
            n = self.sock.recv_into(view)
        self.reader.commit(n)
        events = []
        while (event := self.reader.next_event()) is not None:
            events.append(event)
        return [*events, None] if n == 0 else events


def forward_connection(link: socket.socket, local: socket.socket, port: int, timeout: float = 60.0) -> str:
    """Carry ``local`` (an accepted TCP connection) to ``port`` in the container over ``link`` until both
    directions are finished. Returns how the connection ended; raises ``SessionRefused``."""
    for sock in (link, local):
        sock.setblocking(False)
    ws = ClientWebSocket(link)
    fw = Forwarder(Proto.TCP, port)
    cid: int | None = None
    opened = False  # the server's text preamble arrived and said CONNECTED
    refusing: Refusing | None = None  # it said "Error: ...": the close frame that follows carries the code
    ready = False  # ConnectionReady: the service in the container accepted; reading `local` may start
    local_done = False  # our local socket reached EOF (we sent CLOSE)
    link_open = True
    to_local = bytearray()  # DATA not yet written to the local socket
    remote_eof = False  # RemoteEOF: shut down the local write side once `to_local` is written
    ended: ConnectionClosed | None = None

    def handle(events: list) -> None:
        nonlocal ready, remote_eof, ended
        for event in events:
            if isinstance(event, SendFrame):
                ws.send(OP_BINARY, event.data)
            elif isinstance(event, ConnectionReady):
                ready = True
            elif isinstance(event, DataReceived):
                to_local.extend(event.data)
            elif isinstance(event, RemoteEOF):
                remote_eof = True
            elif isinstance(event, ConnectionClosed):
                ended = event
                if event.aborted:
                    to_local.clear()  # an aborted connection drops what was queued
            # CreditAvailable needs no action: send_credit() is asked again on every turn. Negotiated and
            # PongReceived are informational.

    deadline = time.monotonic() + timeout
    while link_open and (ended is None or ws.out or to_local):
        if time.monotonic() > deadline:
            raise TimeoutError("the forwarded connection did not finish in time")
        credit = fw.send_credit(cid) if cid is not None else 0  # None: the server has no flow control
        read_local = ready and not local_done and credit != 0 and len(ws.out) < MAX_LINK_BACKLOG
        # Stop reading the WebSocket while the local socket is behind: with flow control the server cannot
        # send more than our window anyway; a seed-protocol server is slowed this way instead of overflowing
        # the machine's bounded buffer (which would abort the connection).
        read_link = len(to_local) < MAX_LOCAL_BACKLOG
        readable, writable, _ = select.select(
            [s for s, want in ((link, read_link), (local, read_local)) if want],
            [s for s, want in ((link, bool(ws.out)), (local, bool(to_local))) if want],
            [],
            1.0,
        )
        if link in writable:
            ws.flush()
        if link in readable:
            for message in ws.receive():
                if message is None or isinstance(message, Close):
                    if refusing is not None:
                        close = (message.code, message.reason) if message is not None else (None, "")
                        raise SessionRefused(refusing.closed(*close))
                    link_open = False
                    handle(fw.close("the server closed the session"))
                elif isinstance(message, Ping):
                    ws.send(OP_PONG, message.payload)
                elif not opened and refusing is None:
                    # The session's one text preamble: CONNECTED, or "Error: <reason>" and a close frame.
                    answer = forward_answer(message)  # RemoteProtocolError for anything else
                    if isinstance(answer, Refusing):
                        refusing = answer
                        continue
                    opened = True
                    handle(fw.start())  # HELLO: offer flow control
                    cid, events = fw.open_connection()  # CONNECT
                    handle(events)
                elif isinstance(message, bytes) and opened:
                    handle(fw.receive_frame(message, time.monotonic()))
        if local in writable and to_local:
            n = local.send(to_local)
            del to_local[:n]
            handle(fw.delivered(cid, n))  # the WINDOW credit this frees goes back to the server
        if local in readable and read_local:
            data = local.recv(min(credit or CHUNK, CHUNK))
            if data:
                handle(fw.send_data(cid, data))
            else:
                local_done = True
                handle(fw.local_eof(cid))  # CLOSE: a half-close
        if remote_eof and not to_local:
            remote_eof = False
            local.shutdown(socket.SHUT_WR)
    if link_open:
        ws.send(OP_CLOSE, close_payload(1000))
        link.setblocking(True)
        link.sendall(ws.out)
    if ended is None:
        return "aborted: the session ended first"
    return f"aborted: {ended.reason}" if ended.aborted else "closed"


# -- the demonstration: a fake server playing the container side --------------------------------------------


def fake_server(
    sock: socket.socket, *, refuse: RefusalCode | None = None, hello: bool = True, window: int = 8 << 20
) -> None:
    """The other end of the session: the text preamble, then a ``TunnelClient`` whose TCP service echoes.

    The real server (host, then runner) relays between the CLI and the container's tunnel client; talking to
    the container-side machine directly exercises the same frames. Blocking I/O is fine in a thread here.
    ``hello=False`` plays a seed-protocol server (no flow control); ``window`` is the credit it grants.
    """

    def send(opcode: int, payload: bytes | bytearray | memoryview) -> None:
        sock.sendall(b"".join(frame_parts(opcode, payload)))  # server frames are not masked

    if refuse is not None:
        refusal = forward_refusal(refuse, f"refused for the demonstration ({refuse.value})")
        send(OP_TEXT, refusal.text.encode())
        send(OP_CLOSE, close_payload(refusal.close_code, refusal.close_reason))
        return
    send(OP_TEXT, b"CONNECTED")
    tc = TunnelClient(hello=hello, window=window)
    echo: dict[int, bytearray] = {}  # the echo service's bytes waiting for send credit
    eof_wanted: set[int] = set()
    reader = FrameReader(masked=True, max_message=16 << 20)

    def apply(actions: list) -> None:
        for action in actions:
            if isinstance(action, SendFrame):
                send(OP_BINARY, action.data)
            elif isinstance(action, OpenTcp):
                echo[action.client_id] = bytearray()
                apply(tc.connected(action.client_id))  # the "connect" succeeds at once
            elif isinstance(action, WriteData):
                echo[action.client_id] += action.data
                apply(tc.delivered(action.client_id, len(action.data)))
                pump(action.client_id)
            elif isinstance(action, ShutdownWrite):
                eof_wanted.add(action.client_id)
                pump(action.client_id)
            elif isinstance(action, CreditAvailable):
                pump(action.client_id)
            elif isinstance(action, CloseConnection):
                echo.pop(action.client_id, None)

    def pump(cid: int) -> None:
        buf = echo.get(cid)
        if buf is None:
            return
        while buf and (credit := tc.send_credit(cid)) != 0:
            n = len(buf) if credit is None else min(credit, len(buf))
            chunk = bytes(buf[:n])
            del buf[:n]
            apply(tc.data_read(cid, chunk))
        if not buf and cid in eof_wanted:
            eof_wanted.discard(cid)
            apply(tc.eof(cid))

    apply(tc.start())
    while True:
        with reader.writable(CHUNK) as view:
            n = sock.recv_into(view)
        if n == 0:
            return
        reader.commit(n)
        while (message := reader.next_event()) is not None:
            if isinstance(message, Close):
                send(OP_CLOSE, close_payload(1000))
                return
            if isinstance(message, bytes):
                apply(tc.receive_frame(message, time.monotonic()))


def demo(size: int = 2 << 20, **server: object) -> bytes:
    """Forward one connection to the fake server's echo service; returns what came back. ``server``: the
    keyword arguments of ``fake_server``."""
    link, server_end = socket.socketpair()
    app, local = socket.socketpair()  # `app` stands for the program that connected to `kr forward`'s port
    payload = os.urandom(size)
    received = bytearray()

    def app_writes() -> None:
        with contextlib.suppress(OSError):  # reset when the session fails; the outcome says why
            app.sendall(payload)
            app.shutdown(socket.SHUT_WR)

    def app_reads() -> None:
        with contextlib.suppress(OSError):  # reset when the session fails; the outcome says why
            while chunk := app.recv(CHUNK):
                received.extend(chunk)

    threads = [
        threading.Thread(target=fake_server, args=(server_end,), kwargs=server),
        threading.Thread(target=app_writes),
        threading.Thread(target=app_reads),
    ]
    for thread in threads:
        thread.daemon = True  # a failed run must not hang the interpreter
        thread.start()
    try:
        outcome = forward_connection(link, local, port=8080)
    finally:
        local.close()
        with contextlib.suppress(OSError):
            link.shutdown(socket.SHUT_WR)  # the fake server sees the end, and may still answer our close
        for thread in threads:
            thread.join(timeout=10)
        for sock in (link, app, server_end):
            sock.close()
    if outcome != "closed":
        raise RuntimeError(f"the connection ended badly: {outcome}")
    if bytes(received) != payload:
        raise RuntimeError(f"the echo differs: sent {len(payload)} bytes, got {len(received)}")
    return bytes(received)


if __name__ == "__main__":
    started = time.perf_counter()
    echoed = demo()
    print(f"forwarded {len(echoed)} bytes there and back in {time.perf_counter() - started:.2f} s")
