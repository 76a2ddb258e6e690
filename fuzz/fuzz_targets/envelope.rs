//! The signed-envelope verifier: a valid signed envelope with bytes changed where the input
//! says must verify only if nothing changed, and must never panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use swarmtrain_shared::protocol::{ClientToRelay, Envelope};
use swarmtrain_shared::{Identity, Signed};

static SIGNED: LazyLock<Vec<u8>> = LazyLock::new(|| {
    let envelope = Envelope {
        peer_id: vec![0, 36, 8, 1, 18, 32, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        seq: 42,
        expires_ms: 1_800_000_000_000,
        message: ClientToRelay::AwaitRound {
            run_id: "lm".into(),
            after: Some(3),
        },
    };
    let signed = Identity::from_seed([5; 32]).sign(&envelope).expect("sign");
    postcard::to_allocvec(&signed).expect("encode")
});

fuzz_target!(|data: &[u8]| {
    let mut bytes = SIGNED.clone();
    // Each (position, xor) pair of input bytes flips bits at a position of the message.
    for pair in data.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % bytes.len();
        bytes[at] ^= pair[2];
    }
    let Ok(signed) = postcard::from_bytes::<Signed<Envelope>>(&bytes) else {
        return;
    };
    if signed.verify_and_decode().is_ok() {
        assert_eq!(bytes, *SIGNED, "a changed message verified");
    }
});
