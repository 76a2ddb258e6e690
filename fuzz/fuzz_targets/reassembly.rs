//! Reassembly of long messages from parts sent by many senders in any order: whatever arrives,
//! the buffer stays within its budget and nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarmtrain_shared::protocol::Part;
use swarmtrain_shared::transfer::Reassembly;

const BUDGET: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut parts = Reassembly::with_limits(BUDGET, 16 * 1024);
    let mut now = 0u64;
    // Each 8-byte op: sender, digest byte, total (u16), offset (u16), length (u8), time step.
    for op in data.chunks_exact(8) {
        let part = Part {
            digest: [op[1]; 32],
            total: u32::from(u16::from_le_bytes([op[2], op[3]])),
            offset: u32::from(u16::from_le_bytes([op[4], op[5]])),
            bytes: vec![op[1]; usize::from(op[6]) * 64],
        };
        now += u64::from(op[7]) * 1000;
        let _ = parts.accept(op[0] % 16, part, now);
        assert!(parts.buffered() <= BUDGET);
        assert!(parts.in_progress() <= 16);
    }
});
