//! Reassembly of signed messages longer than one frame.
//!
//! A sender splits the encoded message with [`protocol::requests_for`](crate::protocol::requests_for)
//! and sends the [`Part`]s in order on one connection, waiting for each answer. The receiver keeps
//! at most one message in progress per sender (keyed by what the transport authenticated, such
//! as the libp2p peer id), refuses a message longer than the longest it can use (the relay: its
//! runs' largest update), bounds the bytes buffered for all senders together, forgets a message
//! that stalls or that arrives slower than [`MIN_BYTES_PER_SEC`], and checks the BLAKE3 digest
//! before handing the bytes on. The signature inside is checked afterwards, as for any message.
//! So a sender can hold buffer space only while it keeps sending: a message's time is charged on
//! the bytes it has delivered (not the size it declares), and starting a message over does not
//! restart its clock. When the budget is full, a new part takes the place of a sender that has
//! been idle for [`IDLE_MS`] or (for a sender within its equal share of the budget) of one that
//! holds more than that share, the one idle longest first; that sender is told
//! [`PartError::Evicted`] and starts over later. A full relay is therefore never
//! a fault of the sender: [`PartError::Busy`] and [`PartError::Evicted`] mean "try again".

use std::collections::HashMap;
use std::hash::Hash;

use crate::protocol::{MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, Part};

/// Bytes buffered for all senders together, by default.
pub const DEFAULT_BUDGET: usize = 256 << 20;
/// A message whose next part does not arrive within this time is dropped.
pub const STALL_MS: u64 = 15_000;
/// A message must arrive at this rate on average, counted on the bytes delivered after
/// [`GRACE_MS`], or it is dropped.
pub const MIN_BYTES_PER_SEC: u64 = 16 * 1024;
/// The time a message may take before [`MIN_BYTES_PER_SEC`] applies.
pub const GRACE_MS: u64 = 5_000;
/// A sender that has sent nothing for this long gives its place up to a new part when the
/// budget is full.
pub const IDLE_MS: u64 = 1_000;
/// Senders whose message was evicted are remembered, so that their next part is told so, up
/// to this many (then the oldest are forgotten, and their next part is out of order).
const MAX_EVICTED: usize = 4096;

/// Why a part was refused. The sender must start its message again from offset 0.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartError {
    #[error("part claims a {got}-byte message; the limit is {limit}")]
    TooLarge { got: u32, limit: usize },
    #[error("part of {0} bytes is empty or larger than a frame")]
    BadLength(usize),
    #[error("part at offset {got} does not continue the message (expected offset {expected})")]
    OutOfOrder { got: u32, expected: u32 },
    #[error("part runs past the message's stated length")]
    Overrun,
    #[error("reassembled message does not match its digest")]
    DigestMismatch,
    #[error("the relay is buffering too many long messages; try again shortly")]
    Busy,
    #[error("the relay dropped this message to make room for others; send it again shortly")]
    Evicted,
}

impl PartError {
    /// Whether the refusal is the receiver's doing (full), not the sender's: it must not count
    /// against the sender.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy | Self::Evicted)
    }
}

/// What one accepted part leads to.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// More parts are expected; `received` bytes are buffered.
    More { received: u32 },
    /// The whole message, digest checked.
    Complete(Vec<u8>),
}

#[derive(Debug)]
struct Partial {
    digest: [u8; 32],
    total: u32,
    bytes: Vec<u8>,
    started_ms: u64,
    touched_ms: u64,
}

impl Partial {
    /// Whether the message has stalled or is arriving too slowly at `now_ms`: after
    /// [`GRACE_MS`], the bytes delivered must keep up with [`MIN_BYTES_PER_SEC`].
    fn too_slow(&self, now_ms: u64) -> bool {
        let charged = now_ms
            .saturating_sub(self.started_ms)
            .saturating_sub(GRACE_MS);
        now_ms.saturating_sub(self.touched_ms) >= STALL_MS
            || (self.bytes.len() as u64) * 1000 < charged * MIN_BYTES_PER_SEC
    }
}

/// Messages in progress, one per sender `K`.
#[derive(Debug)]
pub struct Reassembly<K> {
    partial: HashMap<K, Partial>,
    buffered: usize,
    budget: usize,
    max_message: usize,
    /// Senders whose message was evicted, oldest first (at most [`MAX_EVICTED`]).
    evicted: std::collections::VecDeque<K>,
    /// Messages evicted to make room, since the start.
    evictions: u64,
}

impl<K: Eq + Hash + Clone> Default for Reassembly<K> {
    fn default() -> Self {
        Self::with_budget(DEFAULT_BUDGET)
    }
}

impl<K: Eq + Hash + Clone> Reassembly<K> {
    pub fn with_budget(budget: usize) -> Self {
        Self::with_limits(budget, MAX_MESSAGE_BYTES)
    }

    /// Buffers at most `budget` bytes for all senders together, and messages of at most
    /// `max_message` bytes.
    pub fn with_limits(budget: usize, max_message: usize) -> Self {
        Self {
            partial: HashMap::new(),
            buffered: 0,
            budget,
            max_message: max_message.min(MAX_MESSAGE_BYTES),
            evicted: std::collections::VecDeque::new(),
            evictions: 0,
        }
    }

    /// Messages evicted to make room for others since the start.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Makes room for `need` more bytes for `from`, evicting other senders one at a time, the
    /// one that has gone longest without sending first: any sender idle for [`IDLE_MS`] (an
    /// honest sender sends its parts back to back), and, while `from` stays within an equal
    /// share of the budget (the budget over the senders with a message in progress), any
    /// sender holding more than that share. Otherwise `from` waits (`Busy`).
    fn make_room(&mut self, from: &K, need: usize, now_ms: u64) -> Result<(), PartError> {
        while self.buffered + need > self.budget {
            let senders = self.partial.len() + usize::from(!self.partial.contains_key(from));
            let share = self.budget / senders.max(1);
            let holding = self.partial.get(from).map_or(0, |p| p.bytes.len());
            let within_share = holding + need <= share;
            let victim = self
                .partial
                .iter()
                .filter(|(k, p)| {
                    *k != from
                        && (now_ms.saturating_sub(p.touched_ms) >= IDLE_MS
                            || (within_share && p.bytes.len() > share))
                })
                .min_by_key(|(_, p)| p.touched_ms)
                .map(|(k, _)| k.clone());
            let Some(victim) = victim else {
                return Err(PartError::Busy);
            };
            self.drop_sender(&victim);
            self.evictions += 1;
            if self.evicted.len() >= MAX_EVICTED {
                self.evicted.pop_front();
            }
            self.evicted.push_back(victim);
        }
        Ok(())
    }

    /// Bytes buffered now, over all senders.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Messages in progress.
    pub fn in_progress(&self) -> usize {
        self.partial.len()
    }

    /// Takes one part from `from`. A part at offset 0 starts a new message and drops the
    /// sender's unfinished one; any refused part drops the sender's message.
    pub fn accept(&mut self, from: K, part: Part, now_ms: u64) -> Result<Progress, PartError> {
        self.expire(now_ms);
        let result = self.accept_inner(&from, part, now_ms);
        if result.is_err() {
            self.drop_sender(&from);
        }
        result
    }

    fn accept_inner(&mut self, from: &K, part: Part, now_ms: u64) -> Result<Progress, PartError> {
        if part.total as usize > self.max_message {
            return Err(PartError::TooLarge {
                got: part.total,
                limit: self.max_message,
            });
        }
        if part.bytes.is_empty() || part.bytes.len() > MAX_FRAME_BYTES {
            return Err(PartError::BadLength(part.bytes.len()));
        }
        if let Some(i) = self.evicted.iter().position(|k| k == from) {
            self.evicted.remove(i);
            if part.offset != 0 {
                return Err(PartError::Evicted);
            }
        }
        if part.offset == 0 {
            // Starting over does not restart the clock of an unfinished message.
            let started_ms = self.partial.get(from).map_or(now_ms, |p| p.started_ms);
            self.drop_sender(from);
            self.partial.insert(
                from.clone(),
                Partial {
                    digest: part.digest,
                    total: part.total,
                    bytes: Vec::new(),
                    started_ms,
                    touched_ms: now_ms,
                },
            );
        }
        let Some(partial) = self.partial.get_mut(from) else {
            return Err(PartError::OutOfOrder {
                got: part.offset,
                expected: 0,
            });
        };
        let expected = partial.bytes.len() as u32;
        if part.offset != expected || part.digest != partial.digest || part.total != partial.total {
            return Err(PartError::OutOfOrder {
                got: part.offset,
                expected,
            });
        }
        if partial.bytes.len() + part.bytes.len() > partial.total as usize {
            return Err(PartError::Overrun);
        }
        if self.buffered + part.bytes.len() > self.budget {
            self.make_room(from, part.bytes.len(), now_ms)?;
        }
        let Some(partial) = self.partial.get_mut(from) else {
            return Err(PartError::Busy);
        };
        partial.bytes.extend_from_slice(&part.bytes);
        partial.touched_ms = now_ms;
        self.buffered += part.bytes.len();
        if partial.bytes.len() < partial.total as usize {
            return Ok(Progress::More {
                received: partial.bytes.len() as u32,
            });
        }
        let Some(done) = self.partial.remove(from) else {
            return Err(PartError::OutOfOrder {
                got: part.offset,
                expected,
            });
        };
        self.buffered -= done.bytes.len();
        if *blake3::hash(&done.bytes).as_bytes() != done.digest {
            return Err(PartError::DigestMismatch);
        }
        Ok(Progress::Complete(done.bytes))
    }

    /// Forgets `from`'s unfinished message (its connection closed).
    pub fn drop_sender(&mut self, from: &K) {
        if let Some(old) = self.partial.remove(from) {
            self.buffered -= old.bytes.len();
        }
    }

    /// Forgets every message whose last part is older than [`STALL_MS`], or that is arriving
    /// slower than [`MIN_BYTES_PER_SEC`].
    pub fn expire(&mut self, now_ms: u64) {
        let mut freed = 0;
        self.partial.retain(|_, p| {
            let keep = !p.too_slow(now_ms);
            if !keep {
                freed += p.bytes.len();
            }
            keep
        });
        self.buffered -= freed;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(message: &[u8], size: usize) -> Vec<Part> {
        let digest = *blake3::hash(message).as_bytes();
        message
            .chunks(size)
            .enumerate()
            .map(|(i, c)| Part {
                digest,
                total: message.len() as u32,
                offset: (i * size) as u32,
                bytes: c.to_vec(),
            })
            .collect()
    }

    fn message(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
            .collect()
    }

    #[test]
    fn interleaved_senders_each_get_their_message_back() {
        let (a, b) = (message(50_000, 1), message(33_000, 2));
        let mut r = Reassembly::default();
        let (pa, pb) = (parts(&a, 15_000), parts(&b, 15_000));
        let mut done = Vec::new();
        for i in 0..pa.len().max(pb.len()) {
            for (who, ps) in [("a", &pa), ("b", &pb)] {
                if let Some(p) = ps.get(i) {
                    match r.accept(who, p.clone(), 0).expect("accepted") {
                        Progress::More { received } => {
                            assert_eq!(received as usize, (i + 1) * 15_000)
                        }
                        Progress::Complete(bytes) => done.push((who, bytes)),
                    }
                }
            }
        }
        assert_eq!(done, vec![("b", b), ("a", a)]);
        assert_eq!((r.buffered(), r.in_progress()), (0, 0));
    }

    #[test]
    fn bad_parts_are_refused_and_free_their_buffer() {
        let m = message(40_000, 3);
        let ps = parts(&m, 10_000);
        let mut r = Reassembly::default();
        // Out of order: a part with no start.
        assert_eq!(
            r.accept(1, ps[1].clone(), 0),
            Err(PartError::OutOfOrder {
                got: 10_000,
                expected: 0
            })
        );
        // A skipped part drops what was buffered.
        r.accept(1, ps[0].clone(), 0).expect("first");
        assert_eq!(
            r.accept(1, ps[2].clone(), 0),
            Err(PartError::OutOfOrder {
                got: 20_000,
                expected: 10_000
            })
        );
        assert_eq!(r.buffered(), 0);
        // A wrong digest is found at the end.
        let mut forged = ps.clone();
        forged[3].bytes[0] ^= 1;
        for p in &forged[..3] {
            r.accept(1, p.clone(), 0).expect("part");
        }
        assert_eq!(
            r.accept(1, forged[3].clone(), 0),
            Err(PartError::DigestMismatch)
        );
        // Claims beyond the limits.
        let huge = Part {
            digest: [0; 32],
            total: u32::MAX,
            offset: 0,
            bytes: vec![1],
        };
        assert_eq!(
            r.accept(1, huge, 0),
            Err(PartError::TooLarge {
                got: u32::MAX,
                limit: MAX_MESSAGE_BYTES
            })
        );
        let empty = Part {
            digest: [0; 32],
            total: 10,
            offset: 0,
            bytes: vec![],
        };
        assert_eq!(r.accept(1, empty, 0), Err(PartError::BadLength(0)));
        let over = Part {
            digest: [0; 32],
            total: 10,
            offset: 0,
            bytes: vec![0; 11],
        };
        assert_eq!(r.accept(1, over, 0), Err(PartError::Overrun));
        assert_eq!((r.buffered(), r.in_progress()), (0, 0));
    }

    #[test]
    fn the_budget_bounds_memory_and_stalled_messages_expire() {
        let m = message(30_000, 4);
        let ps = parts(&m, 10_000);
        let mut r = Reassembly::with_budget(25_000);
        r.accept("a", ps[0].clone(), 500).expect("a0");
        r.accept("b", ps[0].clone(), 1_000).expect("b0");
        // `c` is owed a third of the budget (8,333 bytes): a part of 10,000 must wait while
        // `a` and `b` are sending.
        assert_eq!(r.accept("c", ps[0].clone(), 1_000), Err(PartError::Busy));
        assert!(PartError::Busy.is_busy());
        assert_eq!(r.buffered(), 20_000);
        // `a` has been idle for IDLE_MS: `c` takes its place.
        r.accept("c", ps[0].clone(), 500 + IDLE_MS)
            .expect("c0 in idle a's place");
        assert_eq!(r.accept("a", ps[1].clone(), 2_000), Err(PartError::Evicted));
        // `b` and `c` stall; after STALL_MS their buffers are freed.
        r.accept("d", ps[0].clone(), STALL_MS + 2_000)
            .expect("d0 after b and c expired");
        assert_eq!((r.in_progress(), r.buffered()), (1, 10_000));
    }

    #[test]
    fn a_sender_within_its_share_takes_the_place_of_the_idlest_one_beyond_it() {
        let m = message(40_000, 6);
        let ps = parts(&m, 5_000);
        let mut r = Reassembly::with_budget(30_000);
        // `hog` holds 25,000 bytes and then idles; `a` holds 5,000.
        for (i, p) in ps[..5].iter().enumerate() {
            r.accept("hog", p.clone(), i as u64).expect("hog");
        }
        r.accept("a", ps[0].clone(), 10).expect("a0");
        // `b` is owed 10,000 (a third): its first part evicts `hog`, not `a`.
        r.accept("b", ps[0].clone(), 20)
            .expect("b0 takes the hog's place");
        assert_eq!(r.evictions(), 1);
        assert_eq!(r.buffered(), 10_000);
        // The evicted sender is told so, once (not a fault of its own), and may start over.
        let refused = r.accept("hog", ps[5].clone(), 30);
        assert_eq!(refused, Err(PartError::Evicted));
        assert!(PartError::Evicted.is_busy());
        r.accept("hog", ps[0].clone(), 40).expect("starting over");
        r.accept("a", ps[1].clone(), 50).expect("a1");
    }

    #[test]
    fn a_sender_may_not_claim_more_than_the_longest_useful_message_nor_trickle() {
        let m = message(100_000, 5);
        let ps = parts(&m, 5_000);
        let mut r = Reassembly::with_limits(1 << 20, 50_000);
        assert_eq!(
            r.accept("a", ps[0].clone(), 0),
            Err(PartError::TooLarge {
                got: 100_000,
                limit: 50_000
            })
        );
        let mut r = Reassembly::with_limits(1 << 20, 100_000);
        // One part just inside every stall window: time is charged on the bytes delivered,
        // whatever size the message declares, so the trickle is dropped at its second part.
        let mut now = 0;
        let mut sent = 0;
        for part in &ps {
            match r.accept("a", part.clone(), now) {
                Ok(_) => sent += 1,
                Err(e) => {
                    assert!(matches!(e, PartError::OutOfOrder { .. }), "{e}");
                    break;
                }
            }
            now += STALL_MS - 1;
        }
        assert_eq!(sent, 1, "{sent} parts by {now} ms");
        // Starting over does not restart the clock: 10,000 bytes by 6 s is too slow.
        r.accept("b", ps[0].clone(), 0).expect("b0");
        r.accept("b", ps[0].clone(), 4_000).expect("b starts over");
        assert!(matches!(
            r.accept("b", ps[1].clone(), 6_000),
            Err(PartError::OutOfOrder { .. })
        ));
        // At the minimum rate a message goes through.
        let mut r = Reassembly::with_limits(1 << 20, 100_000);
        let step = 5_000 * 1000 / MIN_BYTES_PER_SEC;
        for (i, part) in ps.iter().enumerate() {
            r.accept("c", part.clone(), GRACE_MS + i as u64 * step)
                .expect("fast enough");
        }
        assert_eq!(r.buffered(), 0);
    }
}
