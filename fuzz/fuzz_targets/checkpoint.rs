//! The checkpoint reader (safetensors) on any file contents.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = swarmtrain_shared::checkpoint::from_safetensors(data);
});
