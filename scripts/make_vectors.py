"""Regenerate tests/vectors/tunnel_frames.json: hex frames with their decoded meaning.

The vectors are the shared contract between the Python protocol core and the Rust tunnel client. Run this
only when the wire format deliberately changes; tests check the file, they do not rewrite it.
"""

from __future__ import annotations

import json
import pathlib

from kohakuriver_proto import frames
from kohakuriver_proto.frames import MsgType, Proto

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "vectors" / "tunnel_frames.json"


def vector(name, type_code, proto, client_id, port, payload=b"", note=""):
    raw = frames.HEADER.pack(type_code, proto, client_id, port) + payload
    return {
        "name": name,
        "hex": raw.hex(),
        "type": type_code,
        "type_name": MsgType(type_code).name if type_code in MsgType._value2member_map_ else None,
        "proto": proto,
        "client_id": client_id,
        "port": port,
        "payload_hex": payload.hex(),
        "note": note,
    }


def main() -> None:
    valid = [
        vector("connect_tcp", MsgType.CONNECT, Proto.TCP, 1, 8080),
        vector("connect_udp", MsgType.CONNECT, Proto.UDP, 7, 5353),
        vector("connected", MsgType.CONNECTED, Proto.TCP, 1, 0),
        vector("data_hello", MsgType.DATA, Proto.TCP, 1, 0, b"hello"),
        vector("data_empty", MsgType.DATA, Proto.TCP, 42, 0, b"", "empty DATA is legal"),
        vector("data_udp_datagram", MsgType.DATA, Proto.UDP, 3, 0, bytes(range(16))),
        vector("close", MsgType.CLOSE, Proto.TCP, 1, 0),
        vector("error_refused", MsgType.ERROR, Proto.TCP, 9, 0, b"Connection refused (os error 111)"),
        vector("error_utf8", MsgType.ERROR, Proto.TCP, 9, 0, "ポート閉".encode()),
        vector("ping", MsgType.PING, Proto.TCP, 0, 0),
        vector("pong", MsgType.PONG, Proto.TCP, 0, 0),
        vector("max_client_id", MsgType.DATA, Proto.TCP, 0xFFFFFFFF, 0xFFFF, b"\x00\xff"),
        vector(
            "hello_flow_control",
            MsgType.HELLO,
            Proto.TCP,
            0,
            0,
            frames.HELLO_PAYLOAD.pack(1, 262144),
            "features=1 (flow control), window=262144",
        ),
        vector("hello_no_features", MsgType.HELLO, Proto.TCP, 0, 0, frames.HELLO_PAYLOAD.pack(0, 0)),
        vector("window_64k", MsgType.WINDOW, Proto.TCP, 5, 0, frames.WINDOW_PAYLOAD.pack(65536)),
    ]
    unknown = [
        {
            "name": "unknown_type_0x0a",
            "hex": frames.HEADER.pack(0x0A, 0, 1, 0).hex() + "abcd",
            "type": 0x0A,
            "note": "unknown message types decode to an ignorable value",
        },
        {
            "name": "unknown_type_0x00",
            "hex": frames.HEADER.pack(0x00, 0, 0, 0).hex(),
            "type": 0x00,
            "note": "type 0 is not assigned",
        },
    ]
    invalid = [
        {"name": "empty", "hex": "", "note": "shorter than the 8-byte header"},
        {"name": "seven_bytes", "hex": "03000000000100", "note": "shorter than the 8-byte header"},
        {
            "name": "unknown_proto",
            "hex": frames.HEADER.pack(MsgType.DATA, 0x02, 1, 0).hex(),
            "note": "proto 0x02 does not exist (the port-reference seed's TCP=1/UDP=2 is wrong)",
        },
    ]
    doc = {
        "format": ">BBIH header (type u8, proto u8, client_id u32, port u16, big-endian) + payload",
        "valid": valid,
        "unknown_type": unknown,
        "invalid": invalid,
    }
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
