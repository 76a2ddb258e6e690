//! Every codec's decoder on payloads from peers: a decoded update has the model's length and
//! only finite values, or is an error; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarmtrain_shared::compress::Codec;

fuzz_target!(|data: &[u8]| {
    // The codec and the model size first (postcard), the payload after.
    let Ok(((codec, n), payload)) = postcard::take_from_bytes::<(Codec, u16)>(data) else {
        return;
    };
    if codec.check().is_err() {
        return;
    }
    if let Ok(values) = codec.decode(payload, usize::from(n)) {
        assert_eq!(values.len(), usize::from(n));
        assert!(values.iter().all(|v| v.is_finite()));
    }
});
