//! FIPS 203 (ML-KEM-768) and FIPS 204 (ML-DSA-65) known answers for key generation, through the
//! code paths swarmtrain uses: the peer's key offer and the identity derived from a seed. The
//! expected keys are the IETF LAMPS drafts' examples (see `tests/vectors/lamps/README.md`).

use std::path::PathBuf;

use swarmtrain_shared::Identity;
use swarmtrain_shared::seal::{KEM_KEY_BYTES, Offerer};

fn expected(name: &str) -> Vec<u8> {
    // The test process's CARGO_MANIFEST_DIR names this checkout even when the binary was built
    // from another one sharing the target directory.
    let path = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("tests/vectors/lamps")
        .join(name);
    let hex = std::fs::read_to_string(&path).expect("read vector");
    let hex = hex.trim();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn counting<const N: usize>() -> [u8; N] {
    core::array::from_fn(|i| i as u8)
}

#[test]
fn ml_kem_768_key_generation_matches_the_lamps_example() {
    let (_, offer) = Offerer::from_randomness(&counting::<64>(), &[1; 32]);
    assert_eq!(offer.kem_key.len(), KEM_KEY_BYTES);
    assert_eq!(offer.kem_key, expected("ml-kem-768-ek.hex"));
}

#[test]
fn ml_dsa_65_key_generation_matches_the_lamps_example() {
    let identity = Identity::from_seed(counting::<32>());
    assert_eq!(
        identity.public_key(),
        expected("ml-dsa-65-pk.hex").as_slice()
    );
}
