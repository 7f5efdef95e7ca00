//! Manifest parsing on arbitrary bytes and content types: it never panics, and what it
//! accepts is JSON whose every object nests at most `MAX_DEPTH` deep, whose references
//! are valid digests, and whose top-level keys Go clients read the same way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wharf::oci::manifest::{MANIFEST_TYPES, MAX_DEPTH, parse};

fuzz_target!(|input: (u8, &[u8])| {
    let (ct, body) = input;
    let content_type = match ct as usize % (MANIFEST_TYPES.len() + 2) {
        0 => None,
        1 => Some("text/plain"),
        i => Some(MANIFEST_TYPES[i - 2]),
    };
    if let Ok(parsed) = parse(body, content_type) {
        let v: serde_json::Value = serde_json::from_slice(body).expect("accepted means JSON");
        fn depth(v: &serde_json::Value) -> usize {
            match v {
                serde_json::Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
                serde_json::Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
                _ => 0,
            }
        }
        assert!(depth(&v) <= MAX_DEPTH);
        let top = v.as_object().expect("a manifest is an object");
        for k in top.keys() {
            let lower = k.to_ascii_lowercase();
            if lower == "layers" || lower == "manifests" || lower == "config" {
                assert!(k == "layers" || k == "manifests" || k == "config", "{k}");
            }
        }
        for (d, size) in parsed.blobs.iter().chain(&parsed.children) {
            assert!(*size >= 0);
            assert!(d.as_str().starts_with("sha256:") || d.as_str().starts_with("sha512:"));
        }
    }
});
