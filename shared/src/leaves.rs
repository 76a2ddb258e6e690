//! θ in verifiable pieces, so that a browser can take it from several untrusted peers at once.
//!
//! A θ is named by its BLAKE3 hash ([`ParamsHash`]). BLAKE3 is a Merkle tree over 1 KiB chunks
//! whose interior nodes are "chaining values" (CVs), so θ splits into [`LEAF_BYTES`]-byte leaves
//! (aligned subtrees of that tree) and the list of their CVs, the *manifest*, hashes up to the
//! very root hash that the relay signed in its announcement. A joiner takes the manifest from
//! any peer and checks it against that hash ([`Manifest::verify`]); then each leaf, from
//! whichever peer sends it, is checked against its CV on arrival ([`Manifest::check_leaf`]). A
//! peer that lies costs one leaf's retry elsewhere, never a wrong θ: the same verified-streaming
//! idea as Bao and BitTorrent v2's per-file Merkle trees, on BLAKE3's own tree (through
//! `blake3::hazmat`, the interface the BLAKE3 authors provide for exactly this).

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::protocol::ParamsHash;

/// Bytes in one leaf: 8 BLAKE3 chunks, so a leaf and its framing fit one 16 KiB frame.
pub const LEAF_BYTES: usize = 8 * blake3::CHUNK_LEN;

/// Leaves of a θ of `total` bytes (the last one may be short).
pub fn leaf_count(total: usize) -> usize {
    total.div_ceil(LEAF_BYTES)
}

/// The byte range of leaf `index` of a θ of `total` bytes.
pub fn leaf_range(total: usize, index: usize) -> std::ops::Range<usize> {
    let start = (index * LEAF_BYTES).min(total);
    start..(start + LEAF_BYTES).min(total)
}

fn leaf_cv(index: usize, leaf: &[u8]) -> ChainingValue {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset((index * LEAF_BYTES) as u64);
    hasher.update(leaf);
    hasher.finalize_non_root()
}

/// The non-root CV of the subtree of `len` bytes whose leaves' CVs are `cvs`.
fn subtree(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let split = (left / LEAF_BYTES as u64) as usize;
    merge_subtrees_non_root(
        &subtree(&cvs[..split], left),
        &subtree(&cvs[split..], len - left),
        Mode::Hash,
    )
}

/// The CVs of every leaf of a θ, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    total: usize,
    cvs: Vec<ChainingValue>,
}

impl Manifest {
    /// The manifest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            total: bytes.len(),
            cvs: bytes
                .chunks(LEAF_BYTES)
                .enumerate()
                .map(|(i, leaf)| leaf_cv(i, leaf))
                .collect(),
        }
    }

    /// A manifest received from a peer, accepted only if it hashes to `hash`. `total` must come
    /// from the same signed source as `hash` (the announcement's parameter count), never from
    /// the peer: the CVs fix every leaf's length, but the root alone does not fix `total`. A θ
    /// of one leaf has no manifest to check (its one CV is not a root): `None`, as for any
    /// mismatch.
    pub fn verify(hash: ParamsHash, total: usize, cvs: Vec<ChainingValue>) -> Option<Self> {
        if total <= LEAF_BYTES || cvs.len() != leaf_count(total) {
            return None;
        }
        let left = left_subtree_len(total as u64);
        let split = (left / LEAF_BYTES as u64) as usize;
        let root = merge_subtrees_root(
            &subtree(&cvs[..split], left),
            &subtree(&cvs[split..], total as u64 - left),
            Mode::Hash,
        );
        (root.as_bytes() == &hash.0).then_some(Self { total, cvs })
    }

    /// Bytes of the θ it describes.
    pub fn total(&self) -> usize {
        self.total
    }

    pub fn leaves(&self) -> usize {
        self.cvs.len()
    }

    pub fn cvs(&self) -> &[ChainingValue] {
        &self.cvs
    }

    /// Whether `leaf` is leaf `index` of this θ.
    pub fn check_leaf(&self, index: usize, leaf: &[u8]) -> bool {
        index < self.cvs.len()
            && leaf.len() == leaf_range(self.total, index).len()
            && leaf_cv(index, leaf) == self.cvs[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn theta(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn every_manifest_hashes_to_the_root_of_its_theta() {
        // One leaf and a byte, exact powers of two and their neighbours, the LM's θ size.
        for len in [
            LEAF_BYTES + 1,
            2 * LEAF_BYTES,
            2 * LEAF_BYTES + 1,
            3 * LEAF_BYTES - 1,
            8 * LEAF_BYTES,
            8 * LEAF_BYTES + 7,
            17 * LEAF_BYTES,
            544_256,
        ] {
            let bytes = theta(len);
            let manifest = Manifest::of(&bytes);
            assert_eq!(manifest.leaves(), leaf_count(len));
            let checked = Manifest::verify(ParamsHash::of(&bytes), len, manifest.cvs().to_vec());
            assert_eq!(checked.as_ref(), Some(&manifest), "{len} bytes");
            for i in 0..manifest.leaves() {
                assert!(manifest.check_leaf(i, &bytes[leaf_range(len, i)]));
            }
        }
    }

    #[test]
    fn a_lying_peer_is_caught() {
        let bytes = theta(5 * LEAF_BYTES + 100);
        let hash = ParamsHash::of(&bytes);
        let manifest = Manifest::of(&bytes);
        // A wrong CV, one missing, a wrong length, another θ's hash.
        let mut cvs = manifest.cvs().to_vec();
        cvs[3][0] ^= 1;
        assert!(Manifest::verify(hash, bytes.len(), cvs).is_none());
        assert!(Manifest::verify(hash, bytes.len(), manifest.cvs()[1..].to_vec()).is_none());
        assert!(Manifest::verify(hash, bytes.len() - 101, manifest.cvs().to_vec()).is_none());
        assert!(
            Manifest::verify(
                ParamsHash::of(b"other"),
                bytes.len(),
                manifest.cvs().to_vec()
            )
            .is_none()
        );
        // A θ of one leaf has no manifest.
        let small = theta(LEAF_BYTES);
        let one = Manifest::of(&small);
        assert!(
            Manifest::verify(ParamsHash::of(&small), small.len(), one.cvs().to_vec()).is_none()
        );
        // A flipped byte, a leaf at the wrong index, a short leaf, an empty one.
        let mut leaf = bytes[leaf_range(bytes.len(), 2)].to_vec();
        assert!(manifest.check_leaf(2, &leaf));
        assert!(!manifest.check_leaf(1, &leaf));
        leaf[100] ^= 1;
        assert!(!manifest.check_leaf(2, &leaf));
        assert!(!manifest.check_leaf(5, &bytes[5 * LEAF_BYTES..bytes.len() - 1]));
        assert!(!manifest.check_leaf(5, &[]));
        assert!(!manifest.check_leaf(6, &[0; 100]));
    }
}
