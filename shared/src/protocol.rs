//! The wire format: versioned, postcard-encoded, size-limited.
//!
//! Messages are named by direction. Every [`ClientToRelay`] travels in a signed [`Envelope`]
//! that binds it to the libp2p connection it is sent on, numbers it and gives it an expiry, so a
//! captured message cannot be replayed (see [`crate::admission`]); round announcements are
//! signed by the relay. Requests and responses travel over libp2p request-response on
//! [`RPC_PROTOCOL`], each as one postcard frame no longer than [`MAX_FRAME_BYTES`] (16 KiB, what
//! a WebRTC data channel carries).
//!
//! A request frame is a [`Request`]: a [`Submission`] (a signed envelope and, for an update, its
//! payload, which the signature covers by digest) that fits one frame, one [`Part`] of a longer
//! submission (an update of a large model, see [`crate::transfer`]), or a [`Fetch`] of one chunk
//! of public data such as θ_t.

use serde::{Deserialize, Serialize};

use crate::crypto::{CryptoError, Signed};
use crate::lm::LmConfig;
use crate::lm_train::LmInnerSpec;
use crate::seal::{KeyAccept, KeyOffer};

/// Version of the messages below. A relay refuses a `Join` of another version.
///
/// 2: `Welcome` no longer repeats the relay's key (it is the key that signed its `round`).
/// 3: runs name a language model and text data; the inner optimizer carries its schedule and
/// clipping; `Welcome` gives the peer its data slot; announcements carry the held-out loss.
/// 4: every message travels in an [`Envelope`] (connection, sequence number, expiry); an update
/// signs its payload's digest and the payload travels beside it; `Join` carries the admission
/// proof of work.
/// 5: the peer and the relay agree an ML-KEM-768 + X25519 session key (`KeyOffer`, `KeyAccept`,
/// `KeyConfirm`; [`crate::seal`]) that seals update payloads and θ chunks.
/// 6: each signed type is signed under its own FIPS 204 context string
/// ([`crate::crypto::SigningContext`]); the proof-of-work challenge names an epoch.
/// 7: an update commits to the peer's training state at round start ([`Update::state`]); an
/// announcement names the previous round's updates to be replayed ([`RoundAnnouncement::audit`]),
/// whose peers answer with a [`Reveal`] of that state.
/// 8: a `Join` names its [`Role`]; volunteer verifiers ask for replays to run (`Verify`,
/// answered [`RelayToClient::Job`]), fetch the revealed state ([`Fetch::State`]) and send back
/// the payload their replay gives ([`Replayed`]).
/// 9: relays federate: an edge relay joins the root as [`Role::Edge`], is welcomed with a
/// [`Delegation`] that its own peers' `Welcome` carries, and hands its peers' joins, updates and
/// reveals to the root in [`ClientToRelay::Forward`].
/// 10: an edge tells the root where clients reach it and its load ([`ClientToRelay::Report`]),
/// answered with the federation's relays ([`RelayToClient::Federation`]), which every relay's
/// bootstrap document lists for clients to choose from.
pub const PROTOCOL_VERSION: u32 = 10;
/// How long a peer makes its envelopes valid for (10 minutes: long enough for a large update
/// to upload in parts on a slow link).
pub const ENVELOPE_VALIDITY_MS: u64 = 10 * 60_000;
/// The relay refuses envelopes that claim to stay valid for longer than this (their replay
/// protection would have to be kept that long), which leaves 5 minutes for clock skew.
pub const MAX_ENVELOPE_VALIDITY_MS: u64 = 15 * 60_000;
/// libp2p protocol id of the peer ↔ relay request-response exchange.
pub const RPC_PROTOCOL: &str = "/swarmtrain/rpc/1";
/// No request or response frame may exceed this many bytes; larger input is refused unread.
pub const MAX_FRAME_BYTES: usize = 16 * 1024;
/// Frames are kept to this size when they can be: webrtc-rs, the native WebRTC stack, reads a
/// data-channel message into an 8 KiB buffer, so a longer message fails there. A signed message
/// whose frame would be longer goes in [`Part`]s.
pub const PREFERRED_FRAME_BYTES: usize = 8 * 1024 - 256;
/// Payload bytes in one [`Part`] or [`RelayToClient::Chunk`]: a preferred frame less room for
/// the envelope.
pub const CHUNK_BYTES: usize = 7 * 1024;
/// The longest signed message or fetched object, in bytes (θ of a 16M-parameter model).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;
/// libp2p gossipsub topic on which the relay publishes a run's signed announcements, each
/// encoded by [`gossip_announcement`].
pub fn rounds_topic(run_id: &str) -> String {
    format!("/swarmtrain/{run_id}/rounds/2")
}

/// The gossipsub topic a browser subscribes to while it holds at least one direct WebRTC link.
/// Nothing is published on it: the subscription tells the relay that announcements reach this
/// peer through the run's mesh of linked browsers, so the relay sends its own copy only to a few
/// of them (its fanout) and to every peer not subscribed here. A peer that claims links it does
/// not have only delays its own announcements (the long poll still finds each round).
pub const LINKED_TOPIC: &str = "/swarmtrain/linked/1";

/// A signed announcement as the relay gossips it: without the relay's public key, which every
/// subscriber holds from its [`Welcome`]. That is 1,952 bytes less for each subscriber and round.
pub fn gossip_announcement(signed: &Signed<RoundAnnouncement>) -> Result<Vec<u8>, WireError> {
    encode(&signed.without_key())
}

/// Decodes a gossiped announcement and checks that `relay_key` signed it.
pub fn verify_gossiped(frame: &[u8], relay_key: &[u8]) -> Result<RoundAnnouncement, WireError> {
    let signed: Signed<RoundAnnouncement> = decode(frame)?;
    Ok(signed.verify_with_key(relay_key)?)
}

/// One request frame.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// A signed message (with its payload) that fits one frame.
    Submit(Submission),
    /// A piece of a longer [`Submission`], sent in order (see [`crate::transfer`]).
    Part(Part),
    /// A chunk of data, verified by hash: θ (public), or a revealed state (served only to the
    /// connection of the verifier its replay is given to). Unsigned.
    Fetch(Fetch),
}

/// Bytes `offset..offset + bytes.len()` of a postcard-encoded [`Submission`] of `total` bytes
/// whose BLAKE3 hash is `digest`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub digest: [u8; 32],
    pub total: u32,
    pub offset: u32,
    pub bytes: Vec<u8>,
}

/// A chunk of data, by its hash; answered by [`RelayToClient::Chunk`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Fetch {
    /// θ as little-endian f32, by its hash, from byte `offset`.
    Params {
        run_id: String,
        hash: ParamsHash,
        offset: u32,
    },
    /// The revealed state of a [`ReplayJob`] ([`ReplayJob::state`]'s digest), from byte
    /// `offset`: served only on the connection of the verifier the job was given to, while it
    /// holds the job.
    State {
        run_id: String,
        digest: [u8; 32],
        offset: u32,
    },
}

impl Fetch {
    pub fn run_id(&self) -> &str {
        match self {
            Self::Params { run_id, .. } | Self::State { run_id, .. } => run_id,
        }
    }

    /// The byte of the object the chunk starts at.
    pub fn offset(&self) -> u32 {
        match self {
            Self::Params { offset, .. } | Self::State { offset, .. } => *offset,
        }
    }

    /// The digest of the whole object (what a sealed chunk is bound to).
    pub fn digest(&self) -> [u8; 32] {
        match self {
            Self::Params { hash, .. } => hash.0,
            Self::State { digest, .. } => *digest,
        }
    }
}

/// BLAKE3 hash of the little-endian f32 parameter vector: names a checkpoint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ParamsHash(pub [u8; 32]);

impl ParamsHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    pub fn from_hex(hex: &str) -> Option<Self> {
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| Self(*h.as_bytes()))
    }
}

impl core::fmt::Debug for ParamsHash {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ParamsHash({})", &self.to_hex()[..16])
    }
}

/// Encodes parameters as little-endian f32, the form that is hashed and served.
pub fn params_to_bytes(params: &[f32]) -> Vec<u8> {
    params.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes little-endian f32 parameters; `None` if the length is not a multiple of 4.
pub fn params_from_bytes(bytes: &[u8]) -> Option<Vec<f32>> {
    bytes.len().is_multiple_of(4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

/// What a peer sends: a signed [`Envelope`] and the bytes of the update's payload (empty for
/// other messages), which the signed [`Update`] names by digest. The ledger keeps the signed
/// envelope, so anyone can check who sent which update even after its payload is dropped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Submission {
    pub signed: Signed<Envelope>,
    pub payload: Vec<u8>,
}

/// The signed body of every peer message: the message, bound to the libp2p connection it is
/// sent on, numbered and with an expiry. The relay refuses an envelope sent on another
/// connection than `peer_id`'s, one that has expired or claims too long a life, and one whose
/// `seq` it has already seen from the signer ([`crate::admission::ReplayWindow`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's libp2p peer ID (its multihash bytes): the connection this may arrive on.
    pub peer_id: Vec<u8>,
    /// Increases with every envelope the signer makes (peers start from the clock in µs, so a
    /// restarted peer continues above its old numbers).
    pub seq: u64,
    /// Unix time in ms, on the relay's clock, after which the envelope is refused.
    pub expires_ms: u64,
    pub message: ClientToRelay,
}

impl crate::crypto::SigningContext for Envelope {
    const CONTEXT: &'static [u8] = b"swarmtrain/envelope/v6";
}

/// What a peer sends to the relay, inside a signed [`Envelope`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ClientToRelay {
    /// First message: who I am and what I can do.
    Join(Join),
    /// Long poll: answer with the announcement of the first round after `after`.
    AwaitRound { run_id: String, after: Option<u64> },
    /// My pseudo-gradient for `round`.
    Update(Update),
    /// Opens a key exchange: answered by [`RelayToClient::KeyAccept`] ([`crate::seal`]).
    KeyOffer(KeyOffer),
    /// Signs the exchange's transcript hash ([`crate::seal::transcript`]): from the answer
    /// [`RelayToClient::KeysAgreed`] on, this connection's update payloads and θ chunks are
    /// sealed with the agreed keys.
    KeyConfirm { transcript: [u8; 32] },
    /// The committed training state of an update the relay named for a replay; the state
    /// travels (sealed) as the payload. Answered by [`RelayToClient::Revealed`].
    Reveal(Reveal),
    /// A verifier (joined with [`Role::Verify`]) asks for a replay to run; answered by
    /// [`RelayToClient::Job`] when one is waiting, or with none after a short wait.
    Verify { run_id: String },
    /// A verifier's result: the payload its replay of a [`ReplayJob`] gave travels (sealed) as
    /// the payload. Answered by [`RelayToClient::Accepted`] with the job's round.
    Replayed(Replayed),
    /// An edge relay (joined with [`Role::Edge`]) hands the root one of its peers' messages: the
    /// peer's [`Submission`] (its signed envelope and the opened payload), postcard-encoded,
    /// travels (sealed) as the payload. The root checks the peer's signature, expiry and
    /// sequence number itself, as for a message sent to it directly (all but the connection
    /// binding, which the edge checked), and answers as it would answer the peer: a `Join`, an
    /// `Update` and a `Reveal` may be forwarded.
    Forward { run_id: String },
    /// An edge relay (joined with [`Role::Edge`]) tells the root where clients reach it and how
    /// loaded it is; answered by [`RelayToClient::Federation`]. Sent every
    /// [`REPORT_EVERY_MS`]; the root forgets an edge that has not reported for
    /// [`MEMBER_TTL_MS`].
    Report(EdgeReport),
}

/// How often an edge relay reports to its root ([`ClientToRelay::Report`]).
pub const REPORT_EVERY_MS: u64 = 10_000;
/// How long a root lists an edge after its last report.
pub const MEMBER_TTL_MS: u64 = 3 * REPORT_EVERY_MS;
/// The longest relay URL a federation lists ([`Member::url`]); a longer one is refused.
pub const MAX_MEMBER_URL_BYTES: usize = 256;
/// Relays a federation's list holds at most (the root and this many less one edges); the
/// root lists the edges that reported last when it has more.
pub const MAX_MEMBERS: usize = 64;

/// An edge relay's report to its root ([`ClientToRelay::Report`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeReport {
    pub run_id: String,
    /// Where clients reach the edge: its HTTP base URL (`https://edge.example/`), at most
    /// [`MAX_MEMBER_URL_BYTES`], `http` or `https` only.
    pub url: String,
    /// Its load: the libp2p connections it holds.
    pub load: u32,
}

/// One relay of a federation, as `/api/bootstrap` lists it for clients to choose from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its HTTP base URL.
    pub url: String,
    pub role: MemberRole,
    /// The libp2p connections it held when it last said (the root's own, an edge's last report).
    pub load: u32,
}

/// Whether a federation's relay owns the rounds or serves the root's peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberRole {
    Root,
    Edge,
}

impl EdgeReport {
    /// Why the root refuses this report, if it does: its URL ([`check_member_url`]).
    pub fn check(&self) -> Result<(), String> {
        check_member_url(&self.url)
    }
}

/// Why `url` cannot be a federation's relay URL, if it cannot: too long, or not http(s) with a
/// host and without spaces.
pub fn check_member_url(url: &str) -> Result<(), String> {
    if url.len() > MAX_MEMBER_URL_BYTES {
        return Err(format!(
            "a URL of {} bytes (at most {MAX_MEMBER_URL_BYTES})",
            url.len()
        ));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| "a URL that is not http:// or https://".to_owned())?;
    if rest.is_empty() || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a URL without a host, or with spaces".into());
    }
    Ok(())
}

/// What a verifier's replay of job `job` gave: the payload (`Some`, named by digest and length),
/// or `None` when the job could not be replayed (the relay replays it itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Replayed {
    pub run_id: String,
    pub job: u64,
    pub update: Option<PayloadRef>,
}

/// Why a peer joins a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Trains: it is given a data slot and counts toward the round's quorum.
    #[default]
    Train,
    /// Replays other peers' rounds for the relay ([`ClientToRelay::Verify`]): no data slot,
    /// never counted among the round's peers.
    Verify,
    /// An edge relay of a federation joining the root: no data slot, not one of the round's
    /// peers; it forwards its own peers' messages ([`ClientToRelay::Forward`]) and follows the
    /// root's announcements.
    Edge,
}

/// A replay for a verifier to run: everything a drawn update depended on, besides θ_t (fetched
/// by `theta`), the run's windows of `slot` in `round` (over HTTP, as trainers fetch theirs)
/// and the revealed state ([`Fetch::State`]). The update itself is not sent: the verifier
/// returns what its replay gives and the relay compares ([`crate::replay::compare`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayJob {
    pub job: u64,
    pub round: u64,
    pub theta: ParamsHash,
    pub slot: u32,
    /// Steps the update reports: the replay runs these.
    pub steps: u32,
    /// The revealed state, by digest and length ([`crate::replay::CommittedState`]).
    pub state: PayloadRef,
}

/// A peer's answer to an audit: the state its update of `round` committed to
/// ([`Update::state`]), which travels beside it as the payload
/// ([`crate::verify::CommittedState::to_bytes`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reveal {
    pub run_id: String,
    pub round: u64,
    pub state: PayloadRef,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Join {
    pub version: u32,
    pub run_id: String,
    pub capabilities: Capabilities,
    pub role: Role,
    /// The nonce that solves the run's proof-of-work puzzle for this peer's key, when its
    /// admission policy asks for one ([`crate::admission::Admission`]).
    pub proof_of_work: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// "wgpu", "ndarray", "cuda", …: the backend that trains.
    pub backend: String,
    /// Free-form platform description (browser adapter, CPU, …).
    pub platform: String,
}

pub use crate::compress::Codec;

/// The BLAKE3 digest and length of a payload that travels beside a signed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    pub digest: [u8; 32],
    pub len: u32,
}

impl PayloadRef {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            digest: *blake3::hash(bytes).as_bytes(),
            len: bytes.len() as u32,
        }
    }

    /// Whether `bytes` are the payload named here.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        self.len as usize == bytes.len() && *blake3::hash(bytes).as_bytes() == self.digest
    }
}

/// A pseudo-gradient Δ = θ_t − θ_local. The signature of the enclosing envelope covers the run,
/// the round, the base parameters, the sample count, the codec and, by digest, the payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub run_id: String,
    pub round: u64,
    /// Hash of θ_t that the peer started from.
    pub base: ParamsHash,
    pub n_samples: u32,
    pub inner_steps: u32,
    /// Mean training loss over the local steps (for display and the ledger).
    pub loss: f32,
    pub codec: Codec,
    /// The encoded Δ ([`Codec::encode`]), which travels in [`Submission::payload`].
    pub payload: PayloadRef,
    /// Commits to what the round depended on that the relay does not have: the peer's
    /// optimizer moments and schedule position at round start and its error-feedback residual
    /// ([`crate::verify::CommittedState`]). Revealed only if the relay draws the update for a
    /// replay ([`Reveal`]).
    pub state: PayloadRef,
}

/// Declares [`RefusalKind`]: each kind's wire label, whether an honest peer can earn it, and what
/// it means, in one list.
macro_rules! refusal_kinds {
    ($($variant:ident = $label:literal, $hostile:literal, $doc:literal;)*) => {
        /// Why the relay refuses a message: the `kind` of [`RelayToClient::Rejected`] on the wire
        /// (its label) and the label the relay counts refusals under (`/metrics`, `/api/status`).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum RefusalKind {
            $(#[doc = $doc] $variant,)*
        }

        impl RefusalKind {
            /// Every kind.
            pub const ALL: &'static [RefusalKind] = &[$(Self::$variant,)*];

            /// The label on the wire and in the relay's counts (`not_joined`, `replayed`, …).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $label,)*
                }
            }

            /// Whether only a hostile or broken peer earns this refusal: the relay counts each
            /// as a strike against the connection. Honest mishaps (a late update, an envelope
            /// expired after a clock jump, `not_joined` after a relay restart, a busy relay)
            /// are not.
            pub const fn is_hostile(self) -> bool {
                match self {
                    $(Self::$variant => $hostile,)*
                }
            }

            /// The kind a wire label names, if any.
            pub fn parse(label: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|k| k.as_str() == label)
            }
        }
    };
}

refusal_kinds! {
    BadSignature = "bad_signature", true, "The envelope's signature does not verify.";
    Replayed = "replayed", true, "The envelope's sequence number was seen already or is too old.";
    WrongConnection = "wrong_connection", true, "The envelope names another libp2p connection than the one it came on.";
    IdentityMismatch = "identity_mismatch", true, "The connection is bound to another identity.";
    Malformed = "malformed", true, "The message or its payload does not decode.";
    UnboundPart = "unbound_part", true, "A part of a long message on a connection that has sent no valid envelope.";
    BadPart = "bad_part", true, "A part of a long message out of order, too large or over the budget.";
    NotAdmitted = "not_admitted", true, "The run's admission policy refuses the identity (no proof of work, not on the allow-list).";
    BadJoin = "bad_join", true, "A join for another protocol version or run than the one it reached.";
    PayloadMismatch = "payload_mismatch", true, "The payload does not match the digest the message signed.";
    Undecryptable = "undecryptable", true, "A sealed payload does not open with the connection's keys.";
    UnknownSession = "unknown_session", true, "A key confirmation with no key offer pending on the connection.";
    BadKeyOffer = "bad_key_offer", true, "A key offer that does not decode or encapsulate.";
    Banned = "banned", true, "The identity is banned for a while after too many strikes.";
    RevealMismatch = "reveal_mismatch", true, "A revealed state does not match what the update committed to.";
    WrongRun = "wrong_run", false, "The relay has no such run.";
    WrongRound = "wrong_round", false, "The update is for another round than the open one.";
    StaleBase = "stale_base", false, "The update was trained from other parameters than the round's.";
    Duplicate = "duplicate", false, "The peer already sent an update for the round.";
    WrongCodec = "wrong_codec", false, "The update's codec is not the run's.";
    WrongShape = "wrong_shape", false, "The update does not fit the model.";
    NonFinite = "non_finite", false, "The update holds NaN or infinite values.";
    NoSamples = "no_samples", false, "The update claims no samples.";
    Closing = "closing", false, "The round is closing; the update missed it.";
    BadClaim = "bad_claim", false, "The update claims more samples than the run's steps allow.";
    EmptyUpdate = "empty_update", false, "The update is all zeros.";
    Expired = "expired", false, "The envelope expired or claims too long a validity.";
    NotJoined = "not_joined", false, "The identity has not joined the run (in the role the message needs).";
    NotSealed = "not_sealed", false, "The relay takes this only on connections with agreed keys.";
    NotAudited = "not_audited", false, "A reveal for an update the relay did not draw for a replay.";
    UnknownJob = "unknown_job", false, "A verifier's report on a job it does not hold.";
    UnknownParams = "unknown_params", false, "No parameters with that hash.";
    BadFetch = "bad_fetch", false, "A fetch past the end of its object.";
    VerifierBanned = "verifier_banned", false, "The verifier was caught misreporting and may not verify this run.";
    RelayBusy = "relay_busy", false, "The relay has too much in flight; try again shortly.";
    PeerBusy = "peer_busy", false, "The identity has too many requests in flight.";
    IdentityBusy = "identity_busy", false, "The identity is connected on the most peer IDs it may use at once.";
    PollBusy = "poll_busy", false, "A newer long poll from the same identity replaced this one.";
    StoreFailed = "store_failed", false, "The relay could not store the update durably; send it again.";
    Internal = "internal", false, "Something failed inside the relay.";
}

/// A refusal: its kind and, in words, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub reason: String,
}

impl From<Refusal> for RelayToClient {
    fn from(refusal: Refusal) -> Self {
        Self::Rejected {
            kind: refusal.kind.as_str().to_owned(),
            reason: refusal.reason,
        }
    }
}

/// What the relay sends back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RelayToClient {
    /// Boxed: a run spec is far larger than the other answers (the wire form is the same).
    Welcome(Box<Welcome>),
    Round(Signed<RoundAnnouncement>),
    Accepted {
        round: u64,
    },
    /// Refused: `kind` is the label the relay counts it under (`not_joined`, `replayed`,
    /// `wrong_round`, …), `reason` says why in words.
    Rejected {
        kind: String,
        reason: String,
    },
    /// A [`Part`] was buffered; `received` bytes of the message have arrived.
    PartReceived {
        received: u32,
    },
    /// Bytes `offset..` of a fetched object of `total` bytes (sealed when the connection has
    /// agreed keys: [`crate::seal::chunk_context`]).
    Chunk {
        total: u32,
        offset: u32,
        bytes: Vec<u8>,
    },
    /// The relay's half of a key exchange, signed by its ML-DSA key (sent without the key).
    KeyAccept(Signed<KeyAccept>),
    /// The transcript matched: the keys are in use on this connection.
    KeysAgreed,
    /// A [`Reveal`] matched its commitment: the update of `round` is queued for its replay.
    Revealed {
        round: u64,
    },
    /// A replay for a verifier to run ([`ClientToRelay::Verify`]), or none for now.
    Job(Option<ReplayJob>),
    /// The root's answer to the message an edge relay forwarded ([`ClientToRelay::Forward`]):
    /// what the message's sender is to hear. A refusal of the forward itself comes as
    /// `Rejected`, so that the edge never takes its peer's refusal for its own.
    Forwarded(Box<RelayToClient>),
    /// The federation's relays as the root knows them, the root first ([`ClientToRelay::Report`]).
    Federation(Vec<Member>),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub spec: RunSpec,
    /// The current round, signed by the relay.
    pub round: Signed<RoundAnnouncement>,
    /// This peer's data slot in `0..spec.data.n_shards`: which part of every round's data it
    /// trains on (text runs; see [`crate::text::Shards::shard`]). Fixed per peer for the
    /// relay's life, given out in order of first join.
    pub slot: u32,
    /// From an edge relay of a federation: the root's statement, signed with the key that
    /// signs the announcements, that the edge's ML-DSA key speaks for the run on the
    /// connection (it signs the key exchange). `None` from a relay that owns its run. In the
    /// root's welcome to an edge ([`Role::Edge`]) it is the edge's own, for the edge to pass on.
    pub delegation: Option<Signed<Delegation>>,
}

impl Welcome {
    /// The ML-DSA-65 public key that signs every announcement of the run: the key that signed
    /// `round` (the root's, in a federation). (It is not sent a second time; the `Welcome`
    /// arrives over the connection the peer dialled, authenticated by the relay's libp2p
    /// identity.)
    pub fn relay_key(&self) -> &[u8] {
        &self.round.public_key
    }

    /// The key that signs the relay's half of a key exchange on this connection: the relay's
    /// own ([`Self::relay_key`]), or an edge's, when the announcements' key delegated the run
    /// to it. An error when the delegation does not verify or names another run.
    pub fn session_key(&self) -> Result<Vec<u8>, CryptoError> {
        match &self.delegation {
            None => Ok(self.relay_key().to_vec()),
            Some(signed) => {
                let delegation = signed.verify_with_key(self.relay_key())?;
                if delegation.run_id != self.spec.run_id {
                    return Err(CryptoError::Decode(format!(
                        "a delegation for run {:?} in a welcome to run {:?}",
                        delegation.run_id, self.spec.run_id
                    )));
                }
                Ok(delegation.edge_key)
            }
        }
    }
}

/// A root relay's statement that an edge relay serves one of its runs: the edge's ML-DSA-65
/// public key, which signs the key exchanges of the edge's peers. Signed by the root's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delegation {
    pub run_id: String,
    pub edge_key: Vec<u8>,
}

impl crate::crypto::SigningContext for Delegation {
    const CONTEXT: &'static [u8] = b"swarmtrain/delegation/v9";
}

/// The signed announcement that opens a round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundAnnouncement {
    pub run_id: String,
    pub round: u64,
    /// θ_t, fetched by hash over HTTP and verified.
    pub params: ParamsHash,
    pub n_params: u32,
    /// Time left until the round closes, measured when the announcement was sent.
    pub deadline_ms: u64,
    /// Held-out accuracy of θ_t (classifier runs), when it was evaluated.
    pub accuracy: Option<f32>,
    /// Held-out loss of θ_t in nats per token (language-model runs), when it was evaluated.
    pub loss: Option<f32>,
    /// The peers whose update of round `round − 1` the relay replays, drawn after that round
    /// closed: each must send its [`Reveal`] before this round closes, or lose the update's
    /// credit.
    pub audit: Vec<crate::PeerKey>,
}

impl crate::crypto::SigningContext for RoundAnnouncement {
    const CONTEXT: &'static [u8] = b"swarmtrain/round-announcement/v7";
}

/// Everything a peer needs to take part in a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub run_id: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub inner: InnerSpec,
    pub outer: OuterSpec,
    pub codec: Codec,
    /// A round closes as soon as this many updates (or every active peer) have arrived…
    pub quorum: u32,
    /// …or when this much time has passed since it opened.
    pub round_deadline_ms: u64,
    /// Differential privacy: peers clip and noise their updates (None: off).
    pub privacy: Option<crate::privacy::PrivacySpec>,
    /// How the relay combines a round's updates.
    pub aggregator: crate::robust::Rule,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ModelSpec {
    /// The 8×8 digits MLP: 64 → hidden → 10.
    DigitsMlp { hidden: u32 },
    /// The byte-level transformer language model ([`crate::lm`]).
    ByteLm {
        context: u32,
        d_model: u32,
        heads: u32,
        layers: u32,
        mlp_ratio: u32,
    },
}

/// A run's model as the Burn config that builds it.
#[derive(Debug)]
pub enum ModelConfig {
    Digits(crate::model::DigitsMlpConfig),
    Lm(LmConfig),
}

impl ModelSpec {
    /// The Burn config that builds this model: the one mapping from spec to config.
    pub fn config(&self) -> ModelConfig {
        match *self {
            Self::DigitsMlp { hidden } => ModelConfig::Digits(
                crate::model::DigitsMlpConfig::new().with_hidden(hidden as usize),
            ),
            Self::ByteLm {
                context,
                d_model,
                heads,
                layers,
                mlp_ratio,
            } => ModelConfig::Lm(
                LmConfig::new()
                    .with_context(context as usize)
                    .with_d_model(d_model as usize)
                    .with_heads(heads as usize)
                    .with_layers(layers as usize)
                    .with_mlp_ratio(mlp_ratio as usize),
            ),
        }
    }

    /// The language model's shape, for a `ByteLm` run.
    pub fn lm_config(&self) -> Option<LmConfig> {
        match self.config() {
            ModelConfig::Lm(config) => Some(config),
            ModelConfig::Digits(_) => None,
        }
    }

    /// The shape of a language-model config.
    pub fn byte_lm(config: &LmConfig) -> Self {
        Self::ByteLm {
            context: config.context as u32,
            d_model: config.d_model as u32,
            heads: config.heads as u32,
            layers: config.layers as u32,
            mlp_ratio: config.mlp_ratio as u32,
        }
    }

    /// Number of f32 parameters.
    pub fn num_params(&self) -> usize {
        match self.config() {
            ModelConfig::Digits(config) => config.num_params(),
            ModelConfig::Lm(config) => config.num_params(),
        }
    }

    /// The model in words, for pages and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::DigitsMlp { hidden } => format!("digits MLP, {hidden} hidden units"),
            Self::ByteLm {
                context,
                d_model,
                heads,
                layers,
                ..
            } => format!(
                "byte-level transformer, {layers} layer{} × {d_model} wide, {heads} heads, context {context}",
                if *layers == 1 { "" } else { "s" }
            ),
        }
    }
}

/// Where a run's training data comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataSource {
    /// scikit-learn's 8×8 digits, split into `n_shards` labelled shards.
    Digits,
    /// UTF-8 text read by the relay (`name` says which), cut into windows of `context + 1`
    /// bytes; peers fetch each round's windows for their slot.
    Text { name: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataSpec {
    pub source: DataSource,
    /// Digits: training shards, a peer's shard for a round is `data::assign_shard`. Text: data
    /// slots, a peer trains on its slot's windows ([`Welcome::slot`]).
    pub n_shards: u32,
}

/// Inner optimizer: `steps` AdamW steps of `batch_size` examples per round, with the
/// optimizer's settings and learning-rate schedule. A peer keeps its AdamW moments across the
/// rounds of one run, and the schedule's position is the run's global inner step
/// (`round · steps + s`), so every peer is at the same point of the warm-up and decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InnerSpec {
    pub steps: u32,
    pub batch_size: u32,
    pub optimizer: LmInnerSpec,
}

pub use crate::outer::OuterSpec;

/// Why a run's spec cannot work. A relay refuses to start such a run; a peer refuses to join it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("run {run:?}: {reason}")]
pub struct SpecError {
    pub run: String,
    pub reason: String,
}

impl RunSpec {
    /// The samples an update of `steps` inner steps trained on, as the run defines them:
    /// `steps × batch`, with `steps` at most the run's (a peer's count of samples is not used).
    pub fn samples_of(&self, steps: u32) -> u64 {
        u64::from(steps.min(self.inner.steps)) * u64::from(self.inner.batch_size)
    }

    /// Credit units in one sample: the tokens a window predicts for the language model
    /// (its context), 1 for the digits (one image).
    pub fn units_per_sample(&self) -> u64 {
        match self.model {
            ModelSpec::ByteLm { context, .. } => u64::from(context),
            ModelSpec::DigitsMlp { .. } => 1,
        }
    }

    /// What the run calls its credit unit, for pages.
    pub fn unit_name(&self) -> &'static str {
        match self.model {
            ModelSpec::ByteLm { .. } => "tokens",
            ModelSpec::DigitsMlp { .. } => "images",
        }
    }

    /// Checks that the run can work: a model of a sane size whose θ and updates fit the wire,
    /// data that fits the model, optimizer settings that are numbers, and a quorum that gives
    /// the aggregation rule the updates it needs.
    pub fn validate(&self) -> Result<(), SpecError> {
        let fail = |reason: String| {
            Err(SpecError {
                run: self.run_id.clone(),
                reason,
            })
        };
        if self.run_id.is_empty()
            || !self
                .run_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return fail("the run id must be letters, digits, '-' or '_'".into());
        }
        match (&self.model, &self.data.source) {
            (ModelSpec::DigitsMlp { hidden }, DataSource::Digits) => {
                if !(1..=4096).contains(hidden) {
                    return fail(format!("{hidden} hidden units is not in 1..=4096"));
                }
            }
            (ModelSpec::ByteLm { .. }, DataSource::Text { .. }) => {
                let config = self.model.lm_config().unwrap_or_else(LmConfig::new);
                if let Err(e) = config.validate() {
                    return fail(e);
                }
                if config.vocab != crate::text::ByteTokenizer::VOCAB {
                    return fail("the byte-level model needs a vocabulary of 256".into());
                }
            }
            (model, data) => {
                return fail(format!("model {model:?} cannot train on data {data:?}"));
            }
        }
        if let Err(e) = self.codec.check() {
            return fail(format!("codec {:?}: {e}", self.codec));
        }
        if let Codec::TopK { per_million } | Codec::TopKQuant { per_million, .. } = self.codec
            && !(1..=1_000_000).contains(&per_million)
        {
            return fail(format!(
                "top-k keeps 1 to 1,000,000 values per million, not {per_million}"
            ));
        }
        if let Err(reason) = self.aggregator.check() {
            return fail(format!("{:?}: {reason}", self.aggregator));
        }
        let n = self.model.num_params();
        if 4 * n > MAX_MESSAGE_BYTES {
            return fail(format!(
                "θ of {n} parameters is {} bytes; the most a peer fetches is {MAX_MESSAGE_BYTES}",
                4 * n
            ));
        }
        let update = self.codec.encoded_len(n);
        // The signed update: payload plus the envelope (signature, key and fields, < 8 KiB).
        if update + 8 * 1024 > MAX_MESSAGE_BYTES {
            return fail(format!(
                "an update of {update} bytes with codec {:?} does not fit a {MAX_MESSAGE_BYTES}-byte message",
                self.codec
            ));
        }
        if self.data.n_shards == 0 {
            return fail("the data needs at least one shard".into());
        }
        if self.inner.steps == 0 || self.inner.batch_size == 0 {
            return fail("inner steps and batch size must be at least 1".into());
        }
        let o = &self.inner.optimizer;
        let s = &o.schedule;
        let inner_ok = s.peak.is_finite()
            && s.peak > 0.0
            && (0.0..=1.0).contains(&s.min_ratio)
            && o.weight_decay.is_finite()
            && (0.0..1.0).contains(&o.beta_1)
            && (0.0..1.0).contains(&o.beta_2)
            && o.clip_norm.is_none_or(|c| c.is_finite() && c > 0.0);
        if !inner_ok {
            return fail(format!(
                "the inner optimizer's settings are out of range: {o:?}"
            ));
        }
        let outer_ok = self.outer.lr.is_finite()
            && self.outer.lr > 0.0
            && (0.0..1.0).contains(&self.outer.momentum);
        if !outer_ok {
            return fail(format!(
                "the outer learning rate must be positive and the momentum in [0, 1): {:?}",
                self.outer
            ));
        }
        if let Some(dp) = &self.privacy {
            let ok = dp.clip_norm.is_finite()
                && dp.clip_norm > 0.0
                && dp.noise_multiplier.is_finite()
                && dp.noise_multiplier >= 0.0
                && dp.delta > 0.0
                && dp.delta < 1.0;
            if !ok {
                return fail(format!(
                    "differential privacy needs a positive clip norm, a noise multiplier ≥ 0 and \
                     δ in (0, 1): {dp:?}"
                ));
            }
            if self.aggregator != crate::robust::Rule::Mean {
                return fail(format!(
                    "differential privacy noises the clipped sum, whose sensitivity is the clip \
                     norm; {:?} has no such bound: use the mean",
                    self.aggregator
                ));
            }
        }
        let needed = self.aggregator.min_updates();
        if (self.quorum as usize) < needed {
            return fail(format!(
                "{:?} needs at least {needed} updates a round, but the quorum is {}: rounds would \
                 close with too few updates for it (raise the quorum to {needed} or more)",
                self.aggregator, self.quorum
            ));
        }
        if self.aggregator == crate::robust::Rule::Mean
            && self.quorum as usize > crate::exact::MAX_TERMS
        {
            return fail(format!(
                "a quorum of {} is more updates than the exact mean sums in one round ({})",
                self.quorum,
                crate::exact::MAX_TERMS
            ));
        }
        if self.round_deadline_ms == 0 {
            return fail("the round deadline must be positive".into());
        }
        Ok(())
    }
}

/// Why bytes from the network were not accepted as a message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")]
    MessageTooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Encodes any wire message as one postcard frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    let bytes = postcard::to_allocvec(message).map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Encodes a [`Submission`] that travels inside another message's payload (an edge relay's
/// [`ClientToRelay::Forward`]): as long as a message may be, not a frame.
pub fn encode_submission(submission: &Submission) -> Result<Vec<u8>, WireError> {
    let bytes =
        postcard::to_allocvec(submission).map_err(|e| WireError::Malformed(e.to_string()))?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::MessageTooLarge(bytes.len()));
    }
    Ok(bytes)
}

/// Decodes what [`encode_submission`] encodes, refusing oversized input before parsing.
pub fn decode_submission(bytes: &[u8]) -> Result<Submission, WireError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::MessageTooLarge(bytes.len()));
    }
    postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Decodes one postcard frame, refusing oversized input before parsing.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(WireError::TooLarge(bytes.len()));
    }
    postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

/// Splits a submission into the request frames that carry it: itself when its frame is at
/// most [`PREFERRED_FRAME_BYTES`], else [`Part`]s of at most [`CHUNK_BYTES`].
pub fn requests_for(submission: &Submission) -> Result<Vec<Vec<u8>>, WireError> {
    let bytes =
        postcard::to_allocvec(submission).map_err(|e| WireError::Malformed(e.to_string()))?;
    // A `Request::Submit` frame is one tag byte and the submission.
    if bytes.len() < PREFERRED_FRAME_BYTES {
        return Ok(vec![encode(&Request::Submit(submission.clone()))?]);
    }
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(WireError::MessageTooLarge(bytes.len()));
    }
    let digest = *blake3::hash(&bytes).as_bytes();
    let total = bytes.len() as u32;
    bytes
        .chunks(CHUNK_BYTES)
        .enumerate()
        .map(|(i, chunk)| {
            encode(&Request::Part(Part {
                digest,
                total,
                offset: (i * CHUNK_BYTES) as u32,
                bytes: chunk.to_vec(),
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_kinds_have_one_label_each_and_only_misconduct_strikes() {
        let labels: std::collections::BTreeSet<&str> =
            RefusalKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(labels.len(), RefusalKind::ALL.len(), "labels are unique");
        for kind in RefusalKind::ALL {
            assert_eq!(RefusalKind::parse(kind.as_str()), Some(*kind));
        }
        assert_eq!(RefusalKind::parse("no_such_kind"), None);
        // What an honest peer can run into never strikes its connection.
        for honest in [
            "wrong_round",
            "expired",
            "not_joined",
            "relay_busy",
            "peer_busy",
            "closing",
        ] {
            let kind = RefusalKind::parse(honest).expect("a kind");
            assert!(!kind.is_hostile(), "{honest}");
        }
        let wire = RelayToClient::from(Refusal {
            kind: RefusalKind::BadSignature,
            reason: "no".into(),
        });
        assert!(matches!(
            wire,
            RelayToClient::Rejected { kind, .. } if kind == "bad_signature"
        ));
        assert!(RefusalKind::BadSignature.is_hostile());
    }

    #[test]
    fn the_protocol_doc_lists_every_refusal_kind() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md");
        let Ok(doc) = std::fs::read_to_string(path) else {
            return; // a packaged crate has no docs/ beside it
        };
        for kind in RefusalKind::ALL {
            let strike = if kind.is_hostile() { "yes" } else { "no" };
            let row = format!("| `{}` | {strike} |", kind.as_str());
            assert!(doc.contains(&row), "docs/protocol.md lacks the row {row}");
        }
    }
    use crate::crypto::Identity;

    fn envelope(message: ClientToRelay) -> Envelope {
        Envelope {
            peer_id: vec![7; 38],
            seq: 1,
            expires_ms: 1_000,
            message,
        }
    }

    #[test]
    fn signed_requests_round_trip_through_the_wire() {
        let id = Identity::from_seed([3; 32]);
        let msg = envelope(ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: Some(4),
        });
        let frame = encode(&id.sign(&msg).expect("sign")).expect("encode");
        let signed: Signed<Envelope> = decode(&frame).expect("decode");
        assert_eq!(
            signed.verify_and_decode().expect("verify"),
            (id.peer(), msg)
        );
    }

    #[test]
    fn truncated_and_oversized_frames_are_errors() {
        let id = Identity::from_seed([3; 32]);
        let frame = encode(
            &id.sign(&envelope(ClientToRelay::AwaitRound {
                run_id: "r".into(),
                after: None,
            }))
            .expect("sign"),
        )
        .expect("encode");
        for cut in [0, 1, frame.len() / 2, frame.len() - 1] {
            assert!(
                matches!(
                    decode::<Signed<Envelope>>(&frame[..cut]),
                    Err(WireError::Malformed(_))
                ),
                "cut {cut}"
            );
        }
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            decode::<Signed<Envelope>>(&big).unwrap_err(),
            WireError::TooLarge(MAX_FRAME_BYTES + 1)
        );
    }

    #[test]
    fn long_messages_travel_in_parts_that_fit_a_frame() {
        let id = Identity::from_seed([4; 32]);
        let small = Submission {
            signed: id
                .sign(&envelope(ClientToRelay::AwaitRound {
                    run_id: "r".into(),
                    after: None,
                }))
                .expect("sign"),
            payload: Vec::new(),
        };
        let frames = requests_for(&small).expect("split");
        assert_eq!(frames.len(), 1);
        assert!(
            matches!(decode::<Request>(&frames[0]).expect("decode"), Request::Submit(s) if s.signed.body == small.signed.body)
        );

        let payload: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let update = envelope(ClientToRelay::Update(Update {
            run_id: "r".into(),
            round: 3,
            base: ParamsHash([1; 32]),
            n_samples: 1,
            inner_steps: 1,
            loss: 0.5,
            codec: Codec::F32,
            payload: PayloadRef::of(&payload),
            state: PayloadRef::of(&[]),
        }));
        let big = Submission {
            signed: id.sign(&update).expect("sign"),
            payload,
        };
        let frames = requests_for(&big).expect("split");
        assert!(frames.len() > 13, "{} frames", frames.len());
        let mut whole = Vec::new();
        for frame in &frames {
            assert!(
                frame.len() <= PREFERRED_FRAME_BYTES,
                "{} bytes",
                frame.len()
            );
            let Request::Part(part) = decode::<Request>(frame).expect("decode") else {
                panic!("a part")
            };
            assert_eq!(part.offset as usize, whole.len());
            whole.extend_from_slice(&part.bytes);
        }
        let back: Submission = postcard::from_bytes(&whole).expect("whole message");
        assert_eq!(back.signed.verify_and_decode().expect("verify").1, update);
        let ClientToRelay::Update(header) = update.message else {
            unreachable!()
        };
        assert!(header.payload.matches(&back.payload));
        assert!(!header.payload.matches(&back.payload[1..]));
    }

    #[test]
    fn params_bytes_round_trip_and_hash() {
        let params = [0.0f32, -1.5, 3.25, f32::MIN_POSITIVE];
        let bytes = params_to_bytes(&params);
        assert_eq!(params_from_bytes(&bytes).expect("len"), params);
        assert!(params_from_bytes(&bytes[..5]).is_none());
        let hash = ParamsHash::of(&bytes);
        assert_eq!(ParamsHash::from_hex(&hash.to_hex()), Some(hash));
    }
}
