//! Who may join a run, and when a signed message counts: admission policies, the proof-of-work
//! puzzle, and replay protection for signed envelopes.
//!
//! - **Admission** ([`Admission`]) is a run's policy for new identities. `Open` lets anyone in;
//!   `ProofOfWork` makes every new identity solve a puzzle tied to its key (BLAKE3 with
//!   `bits` leading zero bits, about 2^bits hashes to solve, one to check), so minting many
//!   identities costs real CPU; `AllowList` admits only the operator's keys. Nothing here
//!   limits a host to one identity: the puzzle only puts a price on each.
//! - **Replay protection** ([`ReplayGuard`]) follows IPsec's anti-replay window (RFC 4303
//!   §3.4.3) and DTLS's (RFC 9147 §4.5.1): per signer (the relay keys it by identity and
//!   connection), the highest sequence number seen and a bitmap of the 64 below it, so
//!   messages that arrive a little out of order (a long poll and an update sent at once) still
//!   count, and each counts once. Envelopes also expire
//!   ([`crate::protocol::Envelope::expires_ms`]), so a window can be forgotten once every
//!   envelope it accepted has expired: memory follows the identities active in the last
//!   [`MAX_ENVELOPE_VALIDITY_MS`], not all identities ever seen.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::crypto::PeerKey;
use crate::protocol::MAX_ENVELOPE_VALIDITY_MS;

/// A run's admission policy for new identities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "kebab-case")]
pub enum Admission {
    /// Anyone may join.
    #[default]
    Open,
    /// A new identity must solve the run's puzzle: a nonce such that
    /// [`proof_of_work_digest`] has at least `bits` leading zero bits.
    ProofOfWork { bits: u8 },
    /// Only these keys may join.
    AllowList { keys: BTreeSet<PeerKey> },
}

/// What a peer must know of a run's policy before it joins; served in `/api/bootstrap`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionTerms {
    /// "open", "proof-of-work" or "allow-list".
    pub policy: String,
    /// Proof of work: the leading zero bits asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// Proof of work: the run's challenge, 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<String>,
}

/// Why a peer was not admitted.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("this run asks new identities for a proof of work of {0} bits; none was sent")]
    NoProofOfWork(u8),
    #[error("the proof of work does not have {0} leading zero bits")]
    BadProofOfWork(u8),
    #[error("this run admits only the operator's keys; {0} is not one of them")]
    NotAllowed(PeerKey),
}

impl Admission {
    /// Policies whose puzzle would take a peer more than a few minutes are refused.
    pub const MAX_BITS: u8 = 32;

    /// The terms a peer needs, with the run's `challenge`.
    pub fn terms(&self, challenge: &[u8; 32]) -> AdmissionTerms {
        match self {
            Self::Open => AdmissionTerms {
                policy: "open".into(),
                bits: None,
                challenge: None,
            },
            Self::ProofOfWork { bits } => AdmissionTerms {
                policy: "proof-of-work".into(),
                bits: Some(*bits),
                challenge: Some(blake3::Hash::from_bytes(*challenge).to_hex().to_string()),
            },
            Self::AllowList { .. } => AdmissionTerms {
                policy: "allow-list".into(),
                bits: None,
                challenge: None,
            },
        }
    }

    /// Whether `peer`, sending `proof` with its `Join`, may join a run with `challenge`.
    pub fn admit(
        &self,
        challenge: &[u8; 32],
        peer: &PeerKey,
        proof: Option<u64>,
    ) -> Result<(), AdmissionError> {
        match self {
            Self::Open => Ok(()),
            Self::ProofOfWork { bits } => {
                let nonce = proof.ok_or(AdmissionError::NoProofOfWork(*bits))?;
                if leading_zero_bits(&proof_of_work_digest(challenge, peer, nonce))
                    >= u32::from(*bits)
                {
                    Ok(())
                } else {
                    Err(AdmissionError::BadProofOfWork(*bits))
                }
            }
            Self::AllowList { keys } => {
                if keys.contains(peer) {
                    Ok(())
                } else {
                    Err(AdmissionError::NotAllowed(*peer))
                }
            }
        }
    }
}

/// A run's puzzle challenge: fixed by the relay's signing key, the run and an `epoch` the
/// relay draws at random when it starts, so that a solution is worth nothing on another relay
/// or run and can't be computed before the relay announces the challenge (stockpiled before a
/// launch). A relay that restarts draws a new epoch: peers solve again when they join again.
pub fn challenge(relay_public_key: &[u8], run_id: &str, epoch: &[u8; 16]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("swarmtrain admission challenge v2");
    hasher.update(relay_public_key);
    hasher.update(&(run_id.len() as u64).to_le_bytes());
    hasher.update(run_id.as_bytes());
    hasher.update(epoch);
    *hasher.finalize().as_bytes()
}

/// The digest a proof of work is judged by.
pub fn proof_of_work_digest(challenge: &[u8; 32], peer: &PeerKey, nonce: u64) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("swarmtrain admission proof of work v1");
    hasher.update(challenge);
    hasher.update(&peer.0);
    hasher.update(&nonce.to_le_bytes());
    *hasher.finalize().as_bytes()
}

fn leading_zero_bits(digest: &[u8; 32]) -> u32 {
    let mut bits = 0;
    for byte in digest {
        if *byte == 0 {
            bits += 8;
        } else {
            return bits + byte.leading_zeros();
        }
    }
    bits
}

/// The first nonce in `nonces` that solves the puzzle, if any: a solver that must yield now
/// and then (a browser tab) searches a range at a time.
pub fn search_proof_of_work(
    challenge: &[u8; 32],
    peer: &PeerKey,
    bits: u8,
    mut nonces: core::ops::Range<u64>,
) -> Option<u64> {
    nonces.find(|nonce| {
        leading_zero_bits(&proof_of_work_digest(challenge, peer, *nonce)) >= u32::from(bits)
    })
}

/// Finds the first nonce that solves the puzzle (about 2^bits hashes). `None` only if no
/// 64-bit nonce does, which for `bits` ≤ [`Admission::MAX_BITS`] does not happen in practice.
pub fn solve_proof_of_work(challenge: &[u8; 32], peer: &PeerKey, bits: u8) -> Option<u64> {
    search_proof_of_work(challenge, peer, bits, 0..u64::MAX)
}

/// Why an envelope does not count.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReplayError {
    #[error("the message expired {0} ms ago")]
    Expired(u64),
    #[error(
        "the message claims to stay valid for {0} ms; the most allowed is {MAX_ENVELOPE_VALIDITY_MS}"
    )]
    TooLong(u64),
    #[error("message {0} was already received")]
    Replayed(u64),
    #[error("message {seq} is older than the 64 before the newest ({highest})")]
    TooOld { seq: u64, highest: u64 },
    #[error("the relay is tracking {0} active identities; try again shortly")]
    Full(usize),
}

impl ReplayError {
    /// What the relay counts it as and tells the peer.
    pub fn kind(&self) -> crate::protocol::RefusalKind {
        match self {
            Self::Expired(_) | Self::TooLong(_) => crate::protocol::RefusalKind::Expired,
            Self::Replayed(_) | Self::TooOld { .. } => crate::protocol::RefusalKind::Replayed,
            Self::Full(_) => crate::protocol::RefusalKind::RelayBusy,
        }
    }
}

/// One signer's anti-replay window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The highest sequence number accepted, if any.
    highest: Option<u64>,
    /// Bit i: `highest - i` was accepted.
    seen: u64,
    /// The latest expiry among the accepted envelopes.
    expires_ms: u64,
}

impl ReplayWindow {
    /// Accepts `seq` once; refuses it if seen before or too far below the newest.
    pub fn accept(&mut self, seq: u64, expires_ms: u64) -> Result<(), ReplayError> {
        match self.highest {
            Some(highest) if seq <= highest => {
                let back = highest - seq;
                if back >= 64 {
                    return Err(ReplayError::TooOld { seq, highest });
                }
                if self.seen & (1 << back) != 0 {
                    return Err(ReplayError::Replayed(seq));
                }
                self.seen |= 1 << back;
            }
            Some(highest) => {
                let ahead = seq - highest;
                self.seen = if ahead >= 64 { 0 } else { self.seen << ahead };
                self.seen |= 1;
                self.highest = Some(seq);
            }
            None => {
                self.seen = 1;
                self.highest = Some(seq);
            }
        }
        self.expires_ms = self.expires_ms.max(expires_ms);
        Ok(())
    }
}

/// Entries that expire, with expired ones dropped in amortized O(1) per insertion: a queue in
/// insertion order is swept from its front, so nothing ever scans the whole map (a full
/// `retain` under a lock on every message is what a flood would otherwise buy). An entry whose
/// expiry was pushed back since it was queued goes to the back of the queue again.
#[derive(Debug)]
pub struct ExpiringMap<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Keys in the order they were queued, with the expiry they had then.
    order: VecDeque<(K, u64)>,
}

impl<K: Eq + Hash + Clone, V> Default for ExpiringMap<K, V> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: Eq + Hash + Clone, V> ExpiringMap<K, V> {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The live entry for `key` at `now_ms`.
    pub fn get(&self, key: &K, now_ms: u64) -> Option<&V> {
        self.map
            .get(key)
            .filter(|(_, expires)| *expires > now_ms)
            .map(|(v, _)| v)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Drops expired entries from the front of the queue, at most `limit` of them, and stops at
    /// the first live one.
    pub fn sweep(&mut self, now_ms: u64, limit: usize) {
        for _ in 0..limit {
            let Some((key, queued)) = self.order.pop_front() else {
                return;
            };
            match self.map.get(&key).map(|(_, expires)| *expires) {
                // Dropped already (evicted or replaced).
                None => {}
                Some(expires) if expires <= now_ms => {
                    self.map.remove(&key);
                }
                // Its expiry moved later since it was queued: queue it again.
                Some(expires) if expires != queued => self.order.push_back((key, expires)),
                Some(_) => {
                    self.order.push_front((key, queued));
                    return;
                }
            }
        }
    }

    /// Drops the oldest queued entry, live or not (one whose expiry was pushed back since it was
    /// queued is queued again instead).
    pub fn evict_oldest(&mut self) {
        while let Some((key, queued)) = self.order.pop_front() {
            match self.map.get(&key).map(|(_, expires)| *expires) {
                Some(expires) if expires == queued => {
                    self.map.remove(&key);
                    return;
                }
                Some(expires) => self.order.push_back((key, expires)),
                None => {}
            }
        }
    }

    /// Inserts or replaces `key`'s entry, live until `expires_ms`.
    pub fn insert(&mut self, key: K, value: V, expires_ms: u64) {
        self.order.push_back((key.clone(), expires_ms));
        self.map.insert(key, (value, expires_ms));
    }

    /// `key`'s entry and expiry, to change in place (a later expiry must be set with
    /// [`Self::extend`]).
    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.map.get_mut(key).map(|(v, _)| v)
    }

    /// Moves `key`'s expiry to `expires_ms` if that is later.
    pub fn extend(&mut self, key: &K, expires_ms: u64) {
        if let Some((_, expires)) = self.map.get_mut(key) {
            *expires = (*expires).max(expires_ms);
        }
    }
}

/// Replay windows of the signers active within the envelope lifetime, up to a bound. A signer
/// is whatever `K` the user keys it by: an identity, or (as the relay does) an identity on one
/// connection, so that two tabs sharing a seed, each numbering from its own start, do not push
/// each other's messages out of one window.
#[derive(Debug)]
pub struct ReplayGuard<K = PeerKey> {
    windows: ExpiringMap<K, ReplayWindow>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone> ReplayGuard<K> {
    /// Tracks at most `capacity` identities with unexpired envelopes at once (about 120 bytes
    /// each).
    pub fn new(capacity: usize) -> Self {
        Self {
            windows: ExpiringMap::default(),
            capacity,
        }
    }

    /// Identities tracked now.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Checks an envelope from `peer` at `now_ms` (Unix ms) and counts it if it is fresh.
    pub fn check(
        &mut self,
        peer: K,
        seq: u64,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        if expires_ms <= now_ms {
            return Err(ReplayError::Expired(now_ms - expires_ms));
        }
        if expires_ms - now_ms > MAX_ENVELOPE_VALIDITY_MS {
            return Err(ReplayError::TooLong(expires_ms - now_ms));
        }
        // Every envelope a stale window accepted has expired: it can no longer be replayed.
        self.windows.sweep(now_ms, 4);
        if !self.windows.contains_key(&peer) {
            if self.windows.len() >= self.capacity {
                return Err(ReplayError::Full(self.capacity));
            }
            self.windows
                .insert(peer.clone(), ReplayWindow::default(), expires_ms);
        }
        let Some(window) = self.windows.get_mut(&peer) else {
            return Err(ReplayError::Full(self.capacity));
        };
        window.accept(seq, expires_ms)?;
        self.windows.extend(&peer, expires_ms);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_number_counts_once_even_out_of_order() {
        let mut w = ReplayWindow::default();
        w.accept(100, 1).expect("first");
        w.accept(102, 1).expect("ahead");
        w.accept(101, 1).expect("late but new");
        assert_eq!(w.accept(101, 1), Err(ReplayError::Replayed(101)));
        assert_eq!(w.accept(102, 1), Err(ReplayError::Replayed(102)));
        w.accept(102 + 63, 1).expect("far ahead");
        assert_eq!(
            w.accept(101, 1),
            Err(ReplayError::TooOld {
                seq: 101,
                highest: 165
            })
        );
        w.accept(103, 1).expect("63 back, never seen");
        w.accept(10_000, 1).expect("a jump clears the window");
        assert_eq!(w.accept(10_000, 1), Err(ReplayError::Replayed(10_000)));
    }

    #[test]
    fn expired_and_overlong_envelopes_are_refused_and_the_guard_is_bounded() {
        let mut g = ReplayGuard::new(2);
        let (a, b, c) = (PeerKey([1; 32]), PeerKey([2; 32]), PeerKey([3; 32]));
        assert_eq!(g.check(a, 1, 1_000, 1_000), Err(ReplayError::Expired(0)));
        assert_eq!(
            g.check(a, 1, 2_000 + MAX_ENVELOPE_VALIDITY_MS, 1_000),
            Err(ReplayError::TooLong(MAX_ENVELOPE_VALIDITY_MS + 1_000))
        );
        g.check(a, 1, 5_000, 1_000).expect("a");
        g.check(b, 1, 9_000, 1_000).expect("b");
        assert_eq!(g.check(c, 1, 9_000, 2_000), Err(ReplayError::Full(2)));
        assert_eq!(g.check(a, 1, 5_000, 2_000), Err(ReplayError::Replayed(1)));
        // Once a's envelopes have all expired, its window makes room; its old ones stay dead.
        g.check(c, 1, 20_000, 6_000)
            .expect("c, after a's window expired");
        assert_eq!(g.len(), 2);
        assert!(g.check(a, 1, 5_000, 6_000).is_err());
    }

    #[test]
    fn expiring_entries_are_swept_from_the_front_and_evicted_oldest_first() {
        let mut map = ExpiringMap::default();
        for k in 0..10u32 {
            map.insert(k, (), 100 + u64::from(k));
        }
        // Entry 0 is kept alive past the others: sweeping moves it to the back, not away.
        map.extend(&0, 1_000);
        map.sweep(105, 100);
        assert_eq!(map.len(), 5, "1..=5 expired, 0 and 6..=9 live");
        assert!(map.get(&0, 105).is_some() && map.get(&3, 105).is_none());
        // A sweep stops at the first live entry: it never scans past it (20 waits its turn).
        map.insert(20, (), 50);
        map.sweep(105, 100);
        assert_eq!(map.len(), 6);
        // Eviction takes the oldest live entry; 0 was queued again after 6..=9.
        map.evict_oldest();
        assert!(map.get(&6, 105).is_none() && map.get(&0, 105).is_some());
        for _ in 0..3 {
            map.evict_oldest();
        }
        assert!(
            map.get(&0, 105).is_some(),
            "0, extended, is the newest in the queue"
        );
        map.evict_oldest();
        assert!(map.contains_key(&20) && !map.contains_key(&0));
    }

    #[test]
    fn proof_of_work_admits_the_solver_only() {
        let challenge = challenge(b"relay key", "lm", &[0; 16]);
        let (peer, other) = (PeerKey([5; 32]), PeerKey([6; 32]));
        let policy = Admission::ProofOfWork { bits: 12 };
        let nonce = solve_proof_of_work(&challenge, &peer, 12).expect("solvable");
        assert_eq!(policy.admit(&challenge, &peer, Some(nonce)), Ok(()));
        assert_eq!(
            policy.admit(&challenge, &peer, None),
            Err(AdmissionError::NoProofOfWork(12))
        );
        // The same nonce is (almost surely) worthless for another key, run or relay.
        let elsewhere = super::challenge(b"relay key", "digits", &[0; 16]);
        let later = super::challenge(b"relay key", "lm", &[1; 16]);
        assert_ne!(challenge, later, "another epoch, another challenge");
        assert!(
            policy.admit(&challenge, &other, Some(nonce)).is_err()
                || policy.admit(&elsewhere, &peer, Some(nonce)).is_err()
        );
        assert_eq!(Admission::Open.admit(&challenge, &other, None), Ok(()));
        let allow = Admission::AllowList {
            keys: [peer].into(),
        };
        assert_eq!(allow.admit(&challenge, &peer, None), Ok(()));
        assert_eq!(
            allow.admit(&challenge, &other, None),
            Err(AdmissionError::NotAllowed(other))
        );
        let terms = policy.terms(&challenge);
        assert_eq!(terms.policy, "proof-of-work");
        assert_eq!(terms.bits, Some(12));
    }

    #[test]
    fn leading_zero_bits_are_counted_across_bytes() {
        let mut d = [0xffu8; 32];
        assert_eq!(leading_zero_bits(&d), 0);
        d[0] = 0;
        d[1] = 0x10;
        assert_eq!(leading_zero_bits(&d), 11);
        assert_eq!(leading_zero_bits(&[0; 32]), 256);
    }
}
