//! Reassembly of signed messages longer than one frame.
//!
//! A sender splits the encoded message with [`protocol::requests_for`](crate::protocol::requests_for)
//! and sends the [`Part`]s in order on one connection, waiting for each answer. The receiver keeps
//! at most one message in progress per sender (keyed by what the transport authenticated, such
//! as the libp2p peer id), refuses a message longer than the longest it can use (the relay: its
//! runs' largest update), bounds the bytes buffered for all senders together, forgets a message
//! that stalls or that arrives slower than [`MIN_BYTES_PER_SEC`], and checks the BLAKE3 digest
//! before handing the bytes on. The signature inside is checked afterwards, as for any message.
//! So a sender can hold buffer space only while it keeps sending: holding `b` bytes for long
//! costs it `b` bytes of upload every `b /`[`MIN_BYTES_PER_SEC`] seconds.

use std::collections::HashMap;
use std::hash::Hash;

use crate::protocol::{MAX_FRAME_BYTES, MAX_MESSAGE_BYTES, Part};

/// Bytes buffered for all senders together, by default.
pub const DEFAULT_BUDGET: usize = 256 << 20;
/// A message whose next part does not arrive within this time is dropped.
pub const STALL_MS: u64 = 60_000;
/// A message must arrive at this rate on average, after [`STALL_MS`] of grace, or it is dropped.
pub const MIN_BYTES_PER_SEC: u64 = 16 * 1024;

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
    /// Whether the message has stalled or is arriving too slowly at `now_ms`.
    fn too_slow(&self, now_ms: u64) -> bool {
        let allowed = STALL_MS + u64::from(self.total) * 1000 / MIN_BYTES_PER_SEC;
        now_ms.saturating_sub(self.touched_ms) >= STALL_MS
            || now_ms.saturating_sub(self.started_ms) >= allowed
    }
}

/// Messages in progress, one per sender `K`.
#[derive(Debug)]
pub struct Reassembly<K> {
    partial: HashMap<K, Partial>,
    buffered: usize,
    budget: usize,
    max_message: usize,
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
        }
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
        if part.offset == 0 {
            self.drop_sender(from);
            self.partial.insert(
                from.clone(),
                Partial {
                    digest: part.digest,
                    total: part.total,
                    bytes: Vec::new(),
                    started_ms: now_ms,
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
            return Err(PartError::Busy);
        }
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
        r.accept("a", ps[0].clone(), 0).expect("a0");
        r.accept("b", ps[0].clone(), STALL_MS / 2).expect("b0");
        assert_eq!(
            r.accept("c", ps[0].clone(), STALL_MS / 2),
            Err(PartError::Busy)
        );
        assert_eq!(r.buffered(), 20_000);
        // `a` stalls; after STALL_MS its buffer is freed and `c` fits beside `b`.
        r.accept("c", ps[0].clone(), STALL_MS + 1)
            .expect("c0 after a expired");
        assert_eq!(r.in_progress(), 2);
        assert_eq!(r.buffered(), 20_000);
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
        // One part just inside every stall window: the message is still dropped once it has
        // taken longer than its size allows at the minimum rate.
        let allowed = STALL_MS + 100_000 * 1000 / MIN_BYTES_PER_SEC;
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
        assert!(now > allowed && sent < ps.len(), "{sent} parts by {now} ms");
        assert_eq!(r.buffered(), 0);
    }
}
