//! Arbitrary UTF-8 as a `job.toml`: parsing and validation must never panic, and a spec that
//! validates must survive the wire codec and the trip back through TOML.
#![no_main]

use aimatrix_protocol::codec;
use aimatrix_protocol::job::JobSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let spec = match JobSpec::from_toml(text) {
        Ok(spec) => spec,
        Err(error) => {
            // Error rendering runs on every bad file a user submits.
            let _ = error.to_string();
            let _ = error.with_source("job.toml");
            return;
        }
    };
    let _ = spec.escrow();
    let _ = spec.is_resolved();
    let _ = aimatrix_protocol::capability::requirement_class(&spec);

    // The spec travels inside offers and leases: its encoding must decode to the same bytes.
    let bytes = codec::encode(&spec).expect("a valid spec encodes");
    let decoded: JobSpec = codec::decode(&bytes).expect("an encoded spec decodes");
    assert_eq!(codec::encode(&decoded).expect("re-encodes"), bytes, "spec codec roundtrip");

    // `job show`-style rendering, parsed back, is the same spec.
    let rendered = spec.to_toml();
    let reparsed = JobSpec::from_toml(&rendered)
        .unwrap_or_else(|e| panic!("rendered spec does not parse: {e}\n---\n{rendered}"));
    assert_eq!(
        codec::encode(&reparsed).expect("re-encodes"),
        bytes,
        "TOML roundtrip changed the spec:\n---\n{text}\n---\n{rendered}"
    );
});
