//! Arbitrary bytes as a frame from a peer on `/aimatrix/direct/1`, read both as a request (what
//! a relay or node receives) and as a response (what the asking side receives): decoding must
//! never panic, and whatever decodes must re-encode within the limit a reader derives from the
//! frame's first two bytes, to a frame that decodes to the same value.
#![no_main]

use aimatrix_protocol::direct::{self, DirectRequest, DirectResponse};
use aimatrix_protocol::envelope::{Domain, Verifier, VerifyConfig};
use aimatrix_protocol::messages;
use aimatrix_protocol::time::Millis;
use libfuzzer_sys::fuzz_target;

/// A fixed receiver clock for the envelope a message request carries.
const NOW_MS: Millis = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    // A reader learns the frame limit from the first two bytes, before it reads the rest.
    let request_max = direct::request_frame_bytes_max(data);
    let response_max = direct::response_frame_bytes_max(data);
    assert!(request_max >= direct::SMALL_FRAME_BYTES_MAX);
    assert!(response_max >= direct::SMALL_FRAME_BYTES_MAX);

    if let Ok(request) = direct::decode_request(data) {
        assert!(data.len() <= request_max, "a frame over its limit decoded");
        check_request(&request);
    }
    if let Ok(response) = direct::decode_response(data) {
        assert!(data.len() <= response_max, "a frame over its limit decoded");
        check_response(&response);
    }
});

fn check_request(request: &DirectRequest) {
    let _ = format!("{request:?}");
    direct::check_request(request).expect("a decoded request is within its payload limits");
    let frame = direct::encode_request(request).expect("a decoded request re-encodes");
    assert!(frame.len() <= direct::request_frame_bytes_max(&frame), "re-encoded over its limit");
    let again = direct::decode_request(&frame).expect("a re-encoded request decodes");
    assert_eq!(again, *request, "request codec roundtrip");
    let frame_again = direct::encode_request(&again).expect("re-encodes again");
    assert_eq!(frame, frame_again, "request encoding is not stable");
    // A message request goes on to the receiver's core.
    if let DirectRequest::Message(bytes) = request {
        let mut verifier = Verifier::new(VerifyConfig::default());
        let _ = messages::open(&mut verifier, NOW_MS, bytes, &Domain::ALL);
    }
}

fn check_response(response: &DirectResponse) {
    let _ = format!("{response:?}");
    direct::check_response(response).expect("a decoded response is within its payload limits");
    let frame = direct::encode_response(response).expect("a decoded response re-encodes");
    assert!(frame.len() <= direct::response_frame_bytes_max(&frame), "re-encoded over its limit");
    let again = direct::decode_response(&frame).expect("a re-encoded response decodes");
    assert_eq!(again, *response, "response codec roundtrip");
    let frame_again = direct::encode_response(&again).expect("re-encodes again");
    assert_eq!(frame, frame_again, "response encoding is not stable");
    // A reason that decoded is short enough that `refused` keeps it whole.
    if let DirectResponse::Refused(reason) = response {
        assert_eq!(DirectResponse::refused(reason), *response, "refused cut a decoded reason");
    }
}
