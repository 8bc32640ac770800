//! The shared frame vectors (../tests/vectors/tunnel_frames.json, also used by the Python side) against the
//! Rust codec: valid frames decode to their fields and re-encode to the same bytes, unknown types decode to
//! an ignorable `Unknown`, invalid ones are errors.

use bytes::Bytes;
use serde_json::Value;
use tunnel_client::frame::{self, Decoded, Frame, MsgType, Proto};

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/tunnel_frames.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).expect("vectors are JSON")
}

fn bytes_of(v: &Value, key: &str) -> Bytes {
    Bytes::from(hex::decode(v[key].as_str().expect(key)).expect("hex"))
}

fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}"))
}

#[test]
fn valid_vectors_round_trip() {
    let all = vectors();
    let valid = all["valid"].as_array().expect("valid list");
    assert!(valid.len() >= 10);
    for v in valid {
        let name = v["name"].as_str().expect("name");
        let wire = bytes_of(v, "hex");
        let decoded = frame::decode(wire.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Decoded::Frame(f) = decoded else { panic!("{name}: decoded as unknown") };
        assert_eq!(f.kind as u64, num(v, "type"), "{name} type");
        assert_eq!(format!("{:?}", f.kind).to_uppercase(), v["type_name"].as_str().expect("type_name"), "{name}");
        assert_eq!(f.proto as u64, num(v, "proto"), "{name} proto");
        assert_eq!(u64::from(f.client_id), num(v, "client_id"), "{name} client_id");
        assert_eq!(u64::from(f.port), num(v, "port"), "{name} port");
        assert_eq!(f.payload, bytes_of(v, "payload_hex"), "{name} payload");
        assert_eq!(f.encode(), wire, "{name} re-encodes to the same bytes");
        let rebuilt = Frame {
            kind: MsgType::from_u8(num(v, "type") as u8).expect("known"),
            proto: Proto::from_u8(num(v, "proto") as u8).expect("proto"),
            client_id: num(v, "client_id") as u32,
            port: num(v, "port") as u16,
            payload: bytes_of(v, "payload_hex"),
        };
        assert_eq!(rebuilt.encode(), wire, "{name} encodes from its fields");
        match f.kind {
            MsgType::Hello => {
                let h = frame::Hello::parse(&f.payload).expect("hello payload");
                assert_eq!(h.encode(), wire, "{name}");
            }
            MsgType::Window => {
                let credit = frame::parse_window(&f.payload).expect("window payload");
                assert_eq!(frame::encode_window(f.proto, f.client_id, credit), wire, "{name}");
            }
            _ => {}
        }
    }
}

#[test]
fn unknown_types_are_ignorable() {
    let all = vectors();
    let unknown = all["unknown_type"].as_array().expect("unknown_type list");
    assert!(!unknown.is_empty());
    for v in unknown {
        let name = v["name"].as_str().expect("name");
        match frame::decode(bytes_of(v, "hex")) {
            Ok(Decoded::Unknown { type_code, .. }) => assert_eq!(u64::from(type_code), num(v, "type"), "{name}"),
            other => panic!("{name}: expected Unknown, got {other:?}"),
        }
    }
}

#[test]
fn invalid_vectors_are_errors() {
    let all = vectors();
    let invalid = all["invalid"].as_array().expect("invalid list");
    assert!(!invalid.is_empty());
    for v in invalid {
        let name = v["name"].as_str().expect("name");
        assert!(frame::decode(bytes_of(v, "hex")).is_err(), "{name} must not decode");
    }
}
