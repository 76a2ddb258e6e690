//! θ between linked browsers, on [`THETA_PROTOCOL`]: each browser serves the θ versions it
//! holds, and a joiner takes the round's θ from all its linked browsers at once, with the relay
//! as the source of last resort.
//!
//! θ travels as [`LEAF_BYTES`] leaves checked against a manifest of BLAKE3 chaining values
//! (`swarmtrain_shared::leaves`), which is itself checked against the hash in the relay's
//! signed announcement, so any peer may serve any leaf and a lying peer costs one leaf's retry.
//! Each linked browser gets [`PIPELINE`] leaf requests in flight; the relay starts taking
//! leaves when no linked browser is left to ask or after [`RELAY_PATIENCE`], and then also asks
//! for leaves still in flight elsewhere (BitTorrent's "endgame"), so a browser that closes its
//! tab mid-transfer, or answers slowly, delays the joiner by at most that long.

mod fetch;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use swarmtrain_shared::leaves::{LEAF_BYTES, Manifest, leaf_count, leaf_range};
use swarmtrain_shared::protocol::{self, ParamsHash};

/// Browsers serve the θ they hold to the browsers linked to them over this protocol.
pub const THETA_PROTOCOL: &str = "/swarmtrain/theta/2";
/// How long a linked browser may take to answer one θ request before it is given up.
pub const THETA_TIMEOUT: Duration = Duration::from_secs(10);
/// θ versions a browser keeps to serve: the open round's and the one before.
const THETA_KEPT: usize = 2;
/// Chaining values in one manifest answer (8 KiB, within a 16 KiB frame).
const MANIFEST_PAGE: usize = 256;
/// Leaf requests in flight to one linked browser.
pub const PIPELINE: usize = 4;
/// How long the linked browsers have, all pages together, to give a θ's manifest before the
/// θ is fetched from the relay instead (a linked browser may answer each page just inside
/// [`THETA_TIMEOUT`]).
pub const MANIFEST_DEADLINE: Duration = Duration::from_secs(4);
/// How long the linked browsers have the θ to themselves before the relay helps.
pub const RELAY_PATIENCE: Duration = Duration::from_secs(2);
/// Leaves the relay is asked for at once: 56 KiB, exactly 8 of its 7 KiB chunks.
pub const RELAY_RUN: usize = 7;

/// A request to a linked browser for θ by its BLAKE3 hash.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum ThetaRequest {
    /// [`MANIFEST_PAGE`] chaining values of its manifest, from leaf `from` on.
    Manifest { hash: [u8; 32], from: u32 },
    /// One leaf.
    Leaf { hash: [u8; 32], index: u32 },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum ThetaAnswer {
    Manifest { from: u32, cvs: Vec<[u8; 32]> },
    Leaf { index: u32, bytes: Vec<u8> },
    NotHere,
}

struct Held {
    hash: ParamsHash,
    bytes: Arc<Vec<u8>>,
    manifest: Manifest,
}

/// The θ versions this node serves, newest last.
#[derive(Clone, Default)]
pub(crate) struct Served(Arc<Mutex<VecDeque<Held>>>);

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map(|h| h.len()).unwrap_or_default();
        f.debug_struct("Served").field("held", &held).finish()
    }
}

impl Served {
    /// Keeps `bytes` (whose hash is `hash`) to serve to linked browsers.
    pub fn keep(&self, hash: ParamsHash, bytes: &[u8]) {
        if let Ok(mut held) = self.0.lock()
            && !held.iter().any(|h| h.hash == hash)
        {
            if held.len() == THETA_KEPT {
                held.pop_front();
            }
            held.push_back(Held {
                hash,
                manifest: Manifest::of(bytes),
                bytes: Arc::new(bytes.to_vec()),
            });
        }
    }

    /// The answer to a linked browser's request: a manifest page or a leaf of a θ this node
    /// holds, or `NotHere`.
    pub fn answer(&self, request: &[u8]) -> Vec<u8> {
        let answer = protocol::decode::<ThetaRequest>(request)
            .ok()
            .and_then(|request| {
                let held = self.0.lock().ok()?;
                let (hash, at) = match request {
                    ThetaRequest::Manifest { hash, from } => (hash, from),
                    ThetaRequest::Leaf { hash, index } => (hash, index),
                };
                let h = held.iter().find(|h| h.hash.0 == hash)?;
                let at_usize = at as usize;
                match request {
                    ThetaRequest::Manifest { .. } => {
                        let cvs = h.manifest.cvs().get(at_usize..)?;
                        Some(ThetaAnswer::Manifest {
                            from: at,
                            cvs: cvs[..cvs.len().min(MANIFEST_PAGE)].to_vec(),
                        })
                    }
                    ThetaRequest::Leaf { .. } => {
                        (at_usize < h.manifest.leaves()).then(|| ThetaAnswer::Leaf {
                            index: at,
                            bytes: h.bytes[leaf_range(h.bytes.len(), at_usize)].to_vec(),
                        })
                    }
                }
            })
            .unwrap_or(ThetaAnswer::NotHere);
        protocol::encode(&answer).unwrap_or_default()
    }
}

/// Where one θ came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ThetaSources {
    /// θ bytes the relay sent.
    pub relay_bytes: u64,
    /// θ bytes each linked browser sent, in the order they first sent one.
    pub peers: Vec<(PeerId, u64)>,
    /// Why linked browsers stopped being asked (one line each).
    pub failures: Vec<String>,
}

/// Who is asking for leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    Relay,
    Peer(PeerId),
}

/// One θ being put together from several sources: which leaves are here and which are asked
/// for. Pure bookkeeping, driven by the fetch loop in `rpc.rs`.
pub(crate) struct Assembly {
    manifest: Manifest,
    bytes: Vec<u8>,
    have: Vec<bool>,
    asked: Vec<bool>,
    /// The linked browser each leaf was last asked of, until it answers it (so the peers still
    /// owing a leaf when θ is whole can be named).
    owed_by: Vec<Option<PeerId>>,
    missing: usize,
    /// Peer workers still asking.
    active: usize,
    given_up: Vec<PeerId>,
    pub sources: ThetaSources,
}

impl Assembly {
    pub fn new(manifest: Manifest, workers: usize) -> Self {
        let leaves = manifest.leaves();
        Self {
            bytes: vec![0; manifest.total()],
            manifest,
            have: vec![false; leaves],
            asked: vec![false; leaves],
            owed_by: vec![None; leaves],
            missing: leaves,
            active: workers,
            given_up: Vec::new(),
            sources: ThetaSources::default(),
        }
    }

    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    /// The next leaf for `peer` to ask for (None: nothing left to ask, or the peer was given
    /// up). A worker that gets None must call [`Assembly::done`].
    pub fn next_for(&mut self, peer: PeerId) -> Option<usize> {
        if self.given_up.contains(&peer) {
            return None;
        }
        let index = (0..self.have.len()).find(|&i| !self.have[i] && !self.asked[i])?;
        self.asked[index] = true;
        self.owed_by[index] = Some(peer);
        Some(index)
    }

    /// A peer worker has stopped asking.
    pub fn done(&mut self) {
        self.active = self.active.saturating_sub(1);
    }

    /// The leaves the relay should ask for next: a run of up to [`RELAY_RUN`] missing leaves
    /// nobody is asking for; once no peer is left asking or `impatient`, also leaves asked of a
    /// peer that has not answered yet.
    pub fn next_for_relay(&mut self, impatient: bool) -> Option<Range<usize>> {
        let leaves = self.have.len();
        let free = |s: &Self, i: usize| !s.have[i] && !s.asked[i];
        let start = if impatient || self.active == 0 {
            (0..leaves)
                .find(|&i| free(self, i))
                .or_else(|| (0..leaves).find(|&i| !self.have[i]))?
        } else {
            return None;
        };
        // A run of free leaves, or (endgame) of missing ones.
        let want_free = free(self, start);
        let mut end = start + 1;
        while end < leaves
            && end - start < RELAY_RUN
            && !self.have[end]
            && (!want_free || free(self, end))
        {
            end += 1;
        }
        for i in start..end {
            self.asked[i] = true;
        }
        Some(start..end)
    }

    /// Leaf `index` arrived from `source`: true if it is right (or already here).
    pub fn put(&mut self, index: usize, leaf: &[u8], source: Source) -> bool {
        if index >= self.have.len() {
            return false;
        }
        // An answer, right or wrong, settles what the peer owed (a wrong one gives it up).
        if let Source::Peer(peer) = source
            && self.owed_by[index] == Some(peer)
        {
            self.owed_by[index] = None;
        }
        if self.have[index] {
            return true;
        }
        if !self.manifest.check_leaf(index, leaf) {
            self.asked[index] = false;
            return false;
        }
        self.bytes[leaf_range(self.manifest.total(), index)].copy_from_slice(leaf);
        self.have[index] = true;
        self.missing -= 1;
        let n = leaf.len() as u64;
        match source {
            Source::Relay => self.sources.relay_bytes += n,
            Source::Peer(peer) => match self.sources.peers.iter_mut().find(|(p, _)| *p == peer) {
                Some((_, bytes)) => *bytes += n,
                None => self.sources.peers.push((peer, n)),
            },
        }
        true
    }

    /// `peer` failed on leaf `index` (it is asked elsewhere) and is asked no more.
    pub fn give_up(&mut self, peer: PeerId, index: usize, why: String) {
        if index < self.asked.len() && !self.have[index] {
            self.asked[index] = false;
        }
        if index < self.owed_by.len() && self.owed_by[index] == Some(peer) {
            self.owed_by[index] = None;
        }
        if !self.given_up.contains(&peer) {
            self.given_up.push(peer);
            self.sources.failures.push(format!("{peer} {why}"));
        }
    }

    /// θ is whole while some linked browsers still owe a leaf (the relay's endgame took it):
    /// they are given up, as the fetch does not wait for them.
    pub fn give_up_owing(&mut self) {
        let owing: Vec<PeerId> = self.owed_by.iter().flatten().copied().collect();
        for peer in owing {
            self.give_up(
                peer,
                usize::MAX,
                "had not answered when θ was whole (its leaves came from elsewhere)".into(),
            );
        }
    }

    /// The relay failed on `leaves`: they may be asked again.
    pub fn release(&mut self, leaves: Range<usize>) {
        for i in leaves {
            if !self.have[i] {
                self.asked[i] = false;
            }
        }
    }

    pub fn into_bytes(self) -> (Vec<u8>, ThetaSources) {
        (self.bytes, self.sources)
    }
}

/// Appends a manifest page a linked browser sent (asked from `cvs.len()` on) to `cvs`; true
/// once the manifest is complete.
pub(crate) fn manifest_page(
    cvs: &mut Vec<[u8; 32]>,
    total: usize,
    answer: ThetaAnswer,
) -> Result<bool, String> {
    let leaves = leaf_count(total);
    match answer {
        ThetaAnswer::Manifest { from, cvs: page }
            if from as usize == cvs.len()
                && !page.is_empty()
                && cvs.len() + page.len() <= leaves
                && (page.len() == MANIFEST_PAGE || cvs.len() + page.len() == leaves) =>
        {
            cvs.extend(page);
            Ok(cvs.len() == leaves)
        }
        ThetaAnswer::NotHere => Err("does not hold this θ".into()),
        _ => Err("sent a malformed manifest page".into()),
    }
}

/// Whether a θ of `total` bytes is worth taking from peers leaf by leaf (one leaf has no
/// manifest: it comes from the relay).
pub(crate) fn by_leaves(total: usize) -> bool {
    total > LEAF_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn theta(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn ask(served: &Served, request: ThetaRequest) -> ThetaAnswer {
        protocol::decode(&served.answer(&protocol::encode(&request).unwrap())).unwrap()
    }

    #[test]
    fn a_served_theta_is_fetched_back_by_manifest_and_leaves() {
        let bytes = theta(300 * LEAF_BYTES + 5);
        let hash = ParamsHash::of(&bytes);
        let served = Served::default();
        served.keep(hash, &bytes);
        let mut cvs = Vec::new();
        loop {
            let from = cvs.len() as u32;
            let page = ask(&served, ThetaRequest::Manifest { hash: hash.0, from });
            if manifest_page(&mut cvs, bytes.len(), page).unwrap() {
                break;
            }
        }
        // Pages of 256 and one of the rest.
        assert_eq!(cvs.len(), 301);
        let manifest = Manifest::verify(hash, bytes.len(), cvs).unwrap();
        let peer = PeerId::random();
        let mut assembly = Assembly::new(manifest, 1);
        while let Some(i) = assembly.next_for(peer) {
            let ThetaAnswer::Leaf { index, bytes: leaf } = ask(
                &served,
                ThetaRequest::Leaf {
                    hash: hash.0,
                    index: i as u32,
                },
            ) else {
                panic!("no leaf {i}");
            };
            assert!(assembly.put(index as usize, &leaf, Source::Peer(peer)));
        }
        assert!(assembly.complete());
        let (got, sources) = assembly.into_bytes();
        assert_eq!(got, bytes);
        assert_eq!(sources.peers, vec![(peer, bytes.len() as u64)]);
        // θ it does not hold, a leaf past the end, garbage.
        let other = [9; 32];
        assert!(matches!(
            ask(
                &served,
                ThetaRequest::Leaf {
                    hash: other,
                    index: 0
                }
            ),
            ThetaAnswer::NotHere
        ));
        assert!(matches!(
            ask(
                &served,
                ThetaRequest::Leaf {
                    hash: hash.0,
                    index: 301
                }
            ),
            ThetaAnswer::NotHere
        ));
        assert!(matches!(
            protocol::decode(&served.answer(b"\xff\xff")).unwrap(),
            ThetaAnswer::NotHere
        ));
    }

    #[test]
    fn a_lying_or_vanished_peer_costs_a_retry_and_the_relay_finishes() {
        let bytes = theta(20 * LEAF_BYTES);
        let manifest = Manifest::of(&bytes);
        let (honest, liar) = (PeerId::random(), PeerId::random());
        let mut a = Assembly::new(manifest, 2);
        // The relay waits while peers are asking.
        assert_eq!(a.next_for_relay(false), None);
        let i = a.next_for(liar).unwrap();
        assert!(!a.put(i, &[0; LEAF_BYTES], Source::Peer(liar)));
        a.give_up(liar, i, "sent a wrong leaf".into());
        assert_eq!(a.next_for(liar), None);
        a.done();
        // The honest peer takes the leaf back, then vanishes holding another.
        let j = a.next_for(honest).unwrap();
        assert_eq!(j, i);
        assert!(a.put(j, &bytes[leaf_range(bytes.len(), j)], Source::Peer(honest)));
        let k = a.next_for(honest).unwrap();
        a.give_up(honest, k, "closed".into());
        a.done();
        // No one is left asking: the relay takes the rest, in runs.
        let mut runs = 0;
        while let Some(run) = a.next_for_relay(false) {
            assert!(run.len() <= RELAY_RUN);
            for l in run {
                assert!(a.put(l, &bytes[leaf_range(bytes.len(), l)], Source::Relay));
            }
            runs += 1;
        }
        assert!(a.complete());
        assert_eq!(runs, 3);
        let (got, sources) = a.into_bytes();
        assert_eq!(got, bytes);
        assert_eq!(sources.relay_bytes, 19 * LEAF_BYTES as u64);
        assert_eq!(sources.peers, vec![(honest, LEAF_BYTES as u64)]);
        assert_eq!(sources.failures.len(), 2);
    }

    #[test]
    fn an_impatient_relay_also_asks_for_leaves_in_flight() {
        let bytes = theta(3 * LEAF_BYTES);
        let peer = PeerId::random();
        let mut a = Assembly::new(Manifest::of(&bytes), 1);
        let asked: Vec<_> = std::iter::from_fn(|| a.next_for(peer)).collect();
        assert_eq!(asked, vec![0, 1, 2]);
        assert_eq!(a.next_for_relay(false), None);
        assert_eq!(a.next_for_relay(true), Some(0..3));
        // Whichever answer comes second is not counted twice.
        assert!(a.put(1, &bytes[leaf_range(bytes.len(), 1)], Source::Relay));
        assert!(a.put(1, &bytes[leaf_range(bytes.len(), 1)], Source::Peer(peer)));
        assert_eq!(a.sources.relay_bytes, LEAF_BYTES as u64);
        assert!(a.sources.peers.is_empty());
        // The relay finishes θ while the peer still owes leaves 0 and 2: the fetch does not
        // wait for it, and says so.
        assert!(a.put(0, &bytes[leaf_range(bytes.len(), 0)], Source::Relay));
        assert!(a.put(2, &bytes[leaf_range(bytes.len(), 2)], Source::Relay));
        assert!(a.complete());
        a.give_up_owing();
        assert_eq!(a.sources.failures.len(), 1, "{:?}", a.sources.failures);
        assert!(a.sources.failures[0].starts_with(&peer.to_string()));
    }
}
