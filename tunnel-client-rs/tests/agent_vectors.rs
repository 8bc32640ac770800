//! The shared agent vectors (../tests/vectors/agent_heartbeat.json, also checked by the Python side in
//! tests/unit/test_agent_proto.py) against the Rust encoder: every canonical heartbeat encodes to exactly the
//! text the Python encoder writes, so the runner reads what the agent sends.

use serde_json::Value;
use tunnel_client::agent::Heartbeat;

fn vectors() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/agent_heartbeat.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    serde_json::from_str(&text).expect("vectors are JSON")
}

fn int(fields: &Value, key: &str) -> u64 {
    fields[key].as_u64().unwrap_or_else(|| panic!("{key} in {fields}"))
}

fn float(fields: &Value, key: &str) -> f64 {
    fields[key].as_f64().unwrap_or_else(|| panic!("{key} in {fields}"))
}

#[test]
fn canonical_vectors_encode_byte_for_byte() {
    let all = vectors();
    let canonical = all["canonical"].as_array().expect("canonical list");
    assert!(canonical.len() >= 5);
    for v in canonical {
        let name = v["name"].as_str().expect("name");
        let f = &v["fields"];
        assert_eq!(int(f, "version"), u64::from(tunnel_client::agent::VERSION), "{name}");
        let hb = Heartbeat {
            seq: int(f, "seq"),
            hostname: f["hostname"].as_str().expect("hostname").to_string(),
            uptime_seconds: float(f, "uptime_seconds"),
            load1: float(f, "load1"),
            load5: float(f, "load5"),
            load15: float(f, "load15"),
            memory_total_bytes: int(f, "memory_total_bytes"),
            memory_available_bytes: int(f, "memory_available_bytes"),
            disk_total_bytes: int(f, "disk_total_bytes"),
            disk_free_bytes: int(f, "disk_free_bytes"),
            gpus: int(f, "gpus"),
        };
        assert_eq!(hb.encode(), v["text"].as_str().expect("text"), "{name}");
    }
}

#[test]
fn an_encoded_heartbeat_is_json_with_the_fields_in_order() {
    let hb = tunnel_client::agent::sample(&tunnel_client::agent::Sources::default(), 0);
    let text = hb.encode();
    assert!(text.is_ascii());
    let value: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(value["type"], "agent.heartbeat");
    assert_eq!(value["seq"], 0);
    let keys: Vec<&str> = text.split("\":").filter_map(|k| k.rsplit('"').next()).collect();
    let want = [
        "type",
        "version",
        "seq",
        "hostname",
        "uptime_seconds",
        "load1",
        "load5",
        "load15",
        "memory_total_bytes",
        "memory_available_bytes",
        "disk_total_bytes",
        "disk_free_bytes",
        "gpus",
    ];
    assert_eq!(&keys[..want.len()], &want[..], "{text}");
    // This machine's figures are real: it has been up a while, has memory and a root file system.
    assert!(value["memory_total_bytes"].as_u64().unwrap() > 0, "{text}");
    assert!(value["disk_total_bytes"].as_u64().unwrap() > 0, "{text}");
    assert!(value["uptime_seconds"].as_f64().unwrap() > 0.0, "{text}");
}
