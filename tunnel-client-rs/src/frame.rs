//! The tunnel frame (DESIGN section 4): one binary WebSocket message = an 8-byte big-endian `>BBIH` header
//! (type u8, proto u8, client_id u32, port u16) followed by the payload, which is the rest of the message.
//! There is no length field: the WebSocket message boundary delimits the frame.
//!
//! Decoding never copies the payload: it is a `Bytes` slice of the received message. Message types this
//! version does not know decode to [`Decoded::Unknown`] so receivers can ignore them; frames shorter than
//! the header and known types with an unknown proto are errors.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt;

/// Size of the `>BBIH` header.
pub const HEADER_LEN: usize = 8;

/// HELLO feature bit 0: per-connection flow control with WINDOW credits.
pub const FEATURE_FLOW_CONTROL: u32 = 0x1;
/// Default initial per-connection window in bytes.
/// 8 MiB, the same as the runner and `kr forward` (see kohakuriver_proto/frames.py for the measurements):
/// a connection moves at most window / round trip through the whole forward chain.
pub const DEFAULT_WINDOW: u32 = 8 * 1024 * 1024;

/// Message types. 0x01..=0x07 are the seed protocol, 0x08 and 0x09 the negotiated extensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    Connect = 0x01,
    Connected = 0x02,
    Data = 0x03,
    Close = 0x04,
    Error = 0x05,
    Ping = 0x06,
    Pong = 0x07,
    Hello = 0x08,
    Window = 0x09,
}

impl MsgType {
    pub fn from_u8(code: u8) -> Option<Self> {
        Some(match code {
            0x01 => Self::Connect,
            0x02 => Self::Connected,
            0x03 => Self::Data,
            0x04 => Self::Close,
            0x05 => Self::Error,
            0x06 => Self::Ping,
            0x07 => Self::Pong,
            0x08 => Self::Hello,
            0x09 => Self::Window,
            _ => return None,
        })
    }
}

/// Transport of a connection. TCP = 0x00, UDP = 0x01 (the port-reference seed's 1/2 is wrong).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Proto {
    Tcp = 0x00,
    Udp = 0x01,
}

impl Proto {
    pub fn from_u8(code: u8) -> Option<Self> {
        match code {
            0x00 => Some(Self::Tcp),
            0x01 => Some(Self::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// A decoded frame of a known type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: MsgType,
    pub proto: Proto,
    pub client_id: u32,
    pub port: u16,
    pub payload: Bytes,
}

/// The result of decoding one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    Frame(Frame),
    /// A message type this version does not know: receivers log and ignore it (never fatal).
    Unknown {
        type_code: u8,
        proto_code: u8,
        client_id: u32,
        port: u16,
        payload: Bytes,
    },
}

/// Why a message is not a frame. The peer sent it; the receiver logs and ignores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    TooShort(usize),
    UnknownProto { kind: MsgType, proto_code: u8 },
    BadPayload { kind: MsgType, len: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort(n) => write!(f, "frame too short: {n} bytes, the header alone is {HEADER_LEN}"),
            Self::UnknownProto { kind, proto_code } => write!(f, "unknown proto 0x{proto_code:02x} in {kind:?} frame"),
            Self::BadPayload { kind, len } => write!(f, "{kind:?} payload of {len} bytes is malformed"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Parse one binary WebSocket message. The payload is a zero-copy slice of `msg`.
pub fn decode(msg: Bytes) -> Result<Decoded, FrameError> {
    if msg.len() < HEADER_LEN {
        return Err(FrameError::TooShort(msg.len()));
    }
    let type_code = msg[0];
    let proto_code = msg[1];
    let client_id = u32::from_be_bytes([msg[2], msg[3], msg[4], msg[5]]);
    let port = u16::from_be_bytes([msg[6], msg[7]]);
    let payload = msg.slice(HEADER_LEN..);
    let Some(kind) = MsgType::from_u8(type_code) else {
        return Ok(Decoded::Unknown { type_code, proto_code, client_id, port, payload });
    };
    let proto = Proto::from_u8(proto_code).ok_or(FrameError::UnknownProto { kind, proto_code })?;
    Ok(Decoded::Frame(Frame { kind, proto, client_id, port, payload }))
}

/// The header bytes of a frame.
pub fn header(kind: MsgType, proto: Proto, client_id: u32, port: u16) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind as u8;
    h[1] = proto as u8;
    h[2..6].copy_from_slice(&client_id.to_be_bytes());
    h[6..8].copy_from_slice(&port.to_be_bytes());
    h
}

/// Build one frame; the payload is copied once, into the result.
pub fn encode(kind: MsgType, proto: Proto, client_id: u32, port: u16, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
    buf.put_slice(&header(kind, proto, client_id, port));
    buf.put_slice(payload);
    buf.freeze()
}

impl Frame {
    pub fn encode(&self) -> Bytes {
        encode(self.kind, self.proto, self.client_id, self.port, &self.payload)
    }
}

/// HELLO payload `>II`: feature bits and the initial per-connection window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub features: u32,
    pub window: u32,
}

impl Hello {
    pub fn encode(&self) -> Bytes {
        let mut p = [0u8; 8];
        p[..4].copy_from_slice(&self.features.to_be_bytes());
        p[4..].copy_from_slice(&self.window.to_be_bytes());
        encode(MsgType::Hello, Proto::Tcp, 0, 0, &p)
    }

    /// Extra trailing bytes are tolerated so a later version may extend the payload.
    pub fn parse(payload: &[u8]) -> Result<Self, FrameError> {
        if payload.len() < 8 {
            return Err(FrameError::BadPayload { kind: MsgType::Hello, len: payload.len() });
        }
        let features = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let window = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        Ok(Self { features, window })
    }
}

/// WINDOW frame returning `credit` bytes for connection `client_id`.
pub fn encode_window(proto: Proto, client_id: u32, credit: u32) -> Bytes {
    encode(MsgType::Window, proto, client_id, 0, &credit.to_be_bytes())
}

/// The credit of a WINDOW payload (`>I`, exactly four bytes).
pub fn parse_window(payload: &[u8]) -> Result<u32, FrameError> {
    let bytes: [u8; 4] =
        payload.try_into().map_err(|_| FrameError::BadPayload { kind: MsgType::Window, len: payload.len() })?;
    Ok(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_data() {
        let f = Frame {
            kind: MsgType::Data,
            proto: Proto::Udp,
            client_id: 0xdead_beef,
            port: 443,
            payload: Bytes::from_static(b"abc"),
        };
        let wire = f.encode();
        assert_eq!(&wire[..], &[3, 1, 0xde, 0xad, 0xbe, 0xef, 0x01, 0xbb, b'a', b'b', b'c']);
        assert_eq!(decode(wire), Ok(Decoded::Frame(f)));
    }

    #[test]
    fn hello_and_window() {
        let h = Hello { features: FEATURE_FLOW_CONTROL, window: DEFAULT_WINDOW };
        let Ok(Decoded::Frame(f)) = decode(h.encode()) else { panic!("hello must decode") };
        assert_eq!(f.kind, MsgType::Hello);
        assert_eq!(Hello::parse(&f.payload), Ok(h));
        assert!(Hello::parse(&[0; 7]).is_err());
        let Ok(Decoded::Frame(w)) = decode(encode_window(Proto::Tcp, 5, 65536)) else { panic!("window") };
        assert_eq!(parse_window(&w.payload), Ok(65536));
        assert!(parse_window(&[0; 5]).is_err());
    }
}
