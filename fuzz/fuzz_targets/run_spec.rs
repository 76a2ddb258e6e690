//! A run's spec as a peer receives it in `Welcome` (postcard) and as JSON: decoding and
//! validation never panic, and a valid spec's sizes are sane.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarmtrain_shared::protocol::{MAX_MESSAGE_BYTES, RunSpec};

fn check(spec: RunSpec) {
    if spec.validate().is_ok() {
        assert!(4 * spec.model.num_params() <= MAX_MESSAGE_BYTES);
        assert!(spec.codec.encoded_len(spec.model.num_params()) <= MAX_MESSAGE_BYTES);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = postcard::from_bytes::<RunSpec>(data) {
        check(spec);
    }
    if let Ok(spec) = serde_json::from_slice::<RunSpec>(data) {
        check(spec);
    }
});
