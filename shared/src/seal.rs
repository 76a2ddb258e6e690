//! Post-quantum confidentiality for what a peer and the relay exchange: update payloads and θ
//! chunks. libp2p already encrypts every connection (Noise over TCP and WebSocket, DTLS under
//! WebRTC), but with X25519 or ECDHE alone, so recorded traffic could be decrypted by whoever
//! later has a quantum computer ("harvest now, decrypt later"). On top of it, inside the
//! connection, the two ends agree a hybrid key:
//!
//! 1. The peer sends a [`KeyOffer`] (a fresh ML-KEM-768 encapsulation key and X25519 public key)
//!    in its signed envelope: its ML-DSA signature binds the offer to its identity and to the
//!    libp2p connection.
//! 2. The relay encapsulates to it, adds its own X25519 key and signs a [`KeyAccept`] that names
//!    the offer by digest ([`digest_signed`]) with its ML-DSA key.
//! 3. Both hash the transcript (the signed offer, the relay's key and its signed accept;
//!    [`transcript`]), and the peer signs that hash in a `KeyConfirm` envelope, so both ML-DSA
//!    keys have signed the whole exchange (as in SIGMA, the pattern of IKEv2 and TLS 1.3).
//! 4. The keys are HKDF-SHA256 with the transcript hash as salt over the ML-KEM shared secret
//!    followed by the X25519 one (the order of X-Wing and of TLS's X25519MLKEM768), expanded into
//!    one ChaCha20-Poly1305 key per direction ([`SessionKeys`]).
//!
//! The session is secret while either ML-KEM-768 or X25519 holds, and recorded traffic stays
//! secret even once the Noise or DTLS layer underneath is broken. Each sealed message carries its
//! 64-bit counter (the nonce; a key is never used twice with one) and is bound to its context by
//! associated data.

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ml_kem::array::Array;
use ml_kem::kem::Decapsulate;
use ml_kem::{KeyExport, MlKem768};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, Identity, Signed};

/// ML-KEM-768 encapsulation key length in bytes (FIPS 203).
pub const KEM_KEY_BYTES: usize = 1184;
/// ML-KEM-768 ciphertext length in bytes (FIPS 203).
pub const KEM_CIPHERTEXT_BYTES: usize = 1088;
/// What sealing adds to a message: its 8-byte counter and the 16-byte Poly1305 tag.
pub const SEAL_OVERHEAD: usize = 8 + 16;

const TRANSCRIPT_CONTEXT: &str = "swarmtrain/v1 hybrid key exchange transcript";
const SIGNED_CONTEXT: &str = "swarmtrain/v1 signed message digest";
const PEER_TO_RELAY: &[u8] = b"swarmtrain/v1 peer to relay";
const RELAY_TO_PEER: &[u8] = b"swarmtrain/v1 relay to peer";

type DecapsulationKey = ml_kem::DecapsulationKey<MlKem768>;
type EncapsulationKey = ml_kem::EncapsulationKey<MlKem768>;

/// The peer's half of the exchange, sent in its signed envelope.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyOffer {
    /// A fresh ML-KEM-768 encapsulation key ([`KEM_KEY_BYTES`]).
    pub kem_key: Vec<u8>,
    /// A fresh X25519 public key.
    pub x25519: [u8; 32],
}

/// The relay's half, signed by the relay's ML-DSA key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyAccept {
    /// [`digest_signed`] of the peer's signed offer envelope.
    pub offer: [u8; 32],
    /// The ML-KEM-768 ciphertext to the offer's key ([`KEM_CIPHERTEXT_BYTES`]).
    pub ciphertext: Vec<u8>,
    /// The relay's fresh X25519 public key.
    pub x25519: [u8; 32],
}

impl crate::crypto::SigningContext for KeyAccept {
    const CONTEXT: &'static [u8] = b"swarmtrain/key-accept/v6";
}

/// Why a key exchange or a sealed message failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("the operating system gave no randomness")]
    NoRandomness,
    #[error("the offer's ML-KEM-768 key is malformed")]
    BadKemKey,
    #[error("the ML-KEM-768 ciphertext is {0} bytes, not {KEM_CIPHERTEXT_BYTES}")]
    BadCiphertext(usize),
    #[error("the X25519 key is of low order")]
    LowOrder,
    #[error("the accept answers another offer")]
    OtherOffer,
    #[error("the accept is not signed by the relay: {0}")]
    Signature(#[from] CryptoError),
    #[error("a sealed message is {0} bytes, shorter than its counter and tag")]
    Short(usize),
    #[error("a sealed message failed authentication")]
    Forged,
}

/// A digest of a signed message (its signer's key, body and signature), naming it in a
/// transcript.
pub fn digest_signed<T>(signed: &Signed<T>) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(SIGNED_CONTEXT);
    for field in [&signed.public_key, &signed.body, &signed.signature] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    *hasher.finalize().as_bytes()
}

/// The transcript hash both ends sign and key from: the peer's signed offer (by digest), the
/// relay's public key and its signed accept.
pub fn transcript(offer: &[u8; 32], relay_key: &[u8], accept: &Signed<KeyAccept>) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(TRANSCRIPT_CONTEXT);
    hasher.update(offer);
    for field in [relay_key, &accept.body, &accept.signature] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field);
    }
    *hasher.finalize().as_bytes()
}

fn os_random<const N: usize>() -> Result<Zeroizing<[u8; N]>, SealError> {
    let mut bytes = Zeroizing::new([0; N]);
    getrandom::fill(bytes.as_mut()).map_err(|_| SealError::NoRandomness)?;
    Ok(bytes)
}

/// X25519 of `secret` and `public`, refusing an all-zero result (a low-order public key).
fn x25519(secret: &[u8; 32], public: [u8; 32]) -> Result<Zeroizing<[u8; 32]>, SealError> {
    let shared = Zeroizing::new(x25519_dalek::x25519(*secret, public));
    if shared.iter().all(|b| *b == 0) {
        return Err(SealError::LowOrder);
    }
    Ok(shared)
}

/// The peer's side between its offer and the relay's accept. Its secrets are zeroized on drop.
pub struct Offerer {
    kem: DecapsulationKey,
    x25519: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for Offerer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Offerer").finish_non_exhaustive()
    }
}

impl Offerer {
    /// Fresh keys from the operating system's randomness.
    pub fn new() -> Result<(Self, KeyOffer), SealError> {
        Ok(Self::from_randomness(&*os_random()?, &*os_random()?))
    }

    /// Keys from the given randomness: an ML-KEM seed (d ‖ z, FIPS 203 §7.1) and an X25519
    /// secret. Known-answer tests use it; everything else uses [`Offerer::new`].
    pub fn from_randomness(kem_seed: &[u8; 64], x25519: &[u8; 32]) -> (Self, KeyOffer) {
        let kem = DecapsulationKey::from_seed(Array(*kem_seed));
        let x25519 = Zeroizing::new(*x25519);
        let offer = KeyOffer {
            kem_key: kem.encapsulation_key().to_bytes().to_vec(),
            x25519: x25519_dalek::x25519(*x25519, x25519_dalek::X25519_BASEPOINT_BYTES),
        };
        (Self { kem, x25519 }, offer)
    }

    /// Checks the relay's signed accept of `offer` (the digest of the peer's signed offer
    /// envelope) against `relay_key` and derives the session keys.
    pub fn finish(
        self,
        offer: &[u8; 32],
        relay_key: &[u8],
        signed: &Signed<KeyAccept>,
    ) -> Result<SessionKeys, SealError> {
        let accept = signed.verify_with_key(relay_key)?;
        if accept.offer != *offer {
            return Err(SealError::OtherOffer);
        }
        let ciphertext = Array::try_from(accept.ciphertext.as_slice())
            .map_err(|_| SealError::BadCiphertext(accept.ciphertext.len()))?;
        let kem = Zeroizing::new(<[u8; 32]>::from(self.kem.decapsulate(&ciphertext)));
        let dh = x25519(&self.x25519, accept.x25519)?;
        let transcript = transcript(offer, relay_key, signed);
        Ok(SessionKeys::derive(&kem, &dh, transcript, Role::Peer))
    }
}

/// The relay's side: encapsulates to `offer` (sent in the signed envelope named by `digest`),
/// signs the accept with `identity` and derives the session keys, from the operating system's
/// randomness.
pub fn accept(
    identity: &Identity,
    digest: [u8; 32],
    offer: &KeyOffer,
) -> Result<(Signed<KeyAccept>, SessionKeys), SealError> {
    accept_with(identity, digest, offer, &*os_random()?, &*os_random()?)
}

/// [`accept`] with the given encapsulation randomness `m` and X25519 secret (known-answer tests).
pub fn accept_with(
    identity: &Identity,
    digest: [u8; 32],
    offer: &KeyOffer,
    m: &[u8; 32],
    x25519_secret: &[u8; 32],
) -> Result<(Signed<KeyAccept>, SessionKeys), SealError> {
    let key = Array::try_from(offer.kem_key.as_slice()).map_err(|_| SealError::BadKemKey)?;
    let key = EncapsulationKey::new(&key).map_err(|_| SealError::BadKemKey)?;
    let (ciphertext, kem) = key.encapsulate_deterministic(&Array(*m));
    let kem = Zeroizing::new(<[u8; 32]>::from(kem));
    let dh = x25519(x25519_secret, offer.x25519)?;
    let signed = identity.sign(&KeyAccept {
        offer: digest,
        ciphertext: ciphertext.to_vec(),
        x25519: x25519_dalek::x25519(*x25519_secret, x25519_dalek::X25519_BASEPOINT_BYTES),
    })?;
    let transcript = transcript(&digest, identity.public_key(), &signed);
    // Sent without the key: the peer holds it from its `Welcome`.
    Ok((
        signed.without_key(),
        SessionKeys::derive(&kem, &dh, transcript, Role::Relay),
    ))
}

#[derive(Clone, Copy)]
enum Role {
    Peer,
    Relay,
}

/// The keys of one agreed session: one ChaCha20-Poly1305 key for each direction, and the
/// transcript hash that names the session. Zeroized on drop.
pub struct SessionKeys {
    transcript: [u8; 32],
    outbound: Zeroizing<[u8; 32]>,
    inbound: Zeroizing<[u8; 32]>,
    /// The next outbound counter (nonce).
    next: AtomicU64,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field(
                "transcript",
                &&blake3::Hash::from_bytes(self.transcript).to_hex()[..16],
            )
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    fn derive(kem: &[u8; 32], dh: &[u8; 32], transcript: [u8; 32], role: Role) -> Self {
        let mut ikm = Zeroizing::new([0; 64]);
        ikm[..32].copy_from_slice(kem);
        ikm[32..].copy_from_slice(dh);
        let hkdf = hkdf::Hkdf::<sha2::Sha256>::new(Some(&transcript), ikm.as_ref());
        let expand = |info: &[u8]| {
            let mut key = Zeroizing::new([0; 32]);
            hkdf.expand(info, key.as_mut())
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            key
        };
        let (to_relay, to_peer) = (expand(PEER_TO_RELAY), expand(RELAY_TO_PEER));
        let (outbound, inbound) = match role {
            Role::Peer => (to_relay, to_peer),
            Role::Relay => (to_peer, to_relay),
        };
        Self {
            transcript,
            outbound,
            inbound,
            next: AtomicU64::new(0),
        }
    }

    /// The transcript hash: what the peer signs to confirm the session.
    pub fn transcript(&self) -> [u8; 32] {
        self.transcript
    }

    /// Encrypts `plaintext` for the other end, bound to `context` (associated data): the
    /// message's counter, then the ciphertext and tag.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let counter = self.next.fetch_add(1, Ordering::Relaxed);
        let cipher = ChaCha20Poly1305::new(Key::from_slice(self.outbound.as_ref()));
        let sealed = cipher
            .encrypt(
                &nonce(counter),
                Payload {
                    msg: plaintext,
                    aad: context,
                },
            )
            .expect("ChaCha20-Poly1305 seals any message shorter than 256 GiB");
        let mut out = Vec::with_capacity(8 + sealed.len());
        out.extend_from_slice(&counter.to_be_bytes());
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what the other end sealed with the same `context`.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Short(sealed.len()));
        }
        let (counter, body) = sealed.split_at(8);
        let counter = u64::from_be_bytes(counter.try_into().expect("8 bytes"));
        ChaCha20Poly1305::new(Key::from_slice(self.inbound.as_ref()))
            .decrypt(
                &nonce(counter),
                Payload {
                    msg: body,
                    aad: context,
                },
            )
            .map_err(|_| SealError::Forged)
    }
}

fn nonce(counter: u64) -> Nonce {
    let mut nonce = [0; 12];
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::from(nonce)
}

/// The associated data that binds a sealed update payload to the envelope that signs it.
pub fn payload_context(seq: u64) -> Vec<u8> {
    let mut context = b"swarmtrain/v1 payload ".to_vec();
    context.extend_from_slice(&seq.to_be_bytes());
    context
}

/// The associated data that binds a sealed chunk of θ to its place.
pub fn chunk_context(params: &[u8; 32], offset: u32, total: u32) -> Vec<u8> {
    let mut context = b"swarmtrain/v1 params chunk ".to_vec();
    context.extend_from_slice(params);
    context.extend_from_slice(&offset.to_be_bytes());
    context.extend_from_slice(&total.to_be_bytes());
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange() -> (SessionKeys, SessionKeys) {
        let relay = Identity::from_seed([7; 32]);
        let peer = Identity::from_seed([8; 32]);
        let (offerer, offer) = Offerer::new().unwrap();
        let signed_offer = peer
            .sign(&crate::protocol::Envelope {
                peer_id: vec![1],
                seq: 1,
                expires_ms: 1,
                message: crate::protocol::ClientToRelay::KeyOffer(offer.clone()),
            })
            .unwrap();
        let digest = digest_signed(&signed_offer);
        let (signed, relay_keys) = accept(&relay, digest, &offer).unwrap();
        let peer_keys = offerer
            .finish(&digest, relay.public_key(), &signed)
            .unwrap();
        (peer_keys, relay_keys)
    }

    #[test]
    fn both_ends_agree_and_each_direction_has_its_key() {
        let (peer, relay) = exchange();
        assert_eq!(peer.transcript(), relay.transcript());
        let sealed = peer.seal(b"ctx", b"delta");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(relay.open(b"ctx", &sealed).unwrap(), b"delta");
        // A message can't be reflected back to its sender.
        assert_eq!(peer.open(b"ctx", &sealed), Err(SealError::Forged));
        let back = relay.seal(b"chunk", b"theta");
        assert_eq!(peer.open(b"chunk", &back).unwrap(), b"theta");
        // Counters advance, so the same plaintext never gives the same ciphertext.
        assert_ne!(peer.seal(b"ctx", b"delta"), sealed);
    }

    #[test]
    fn tampering_and_wrong_context_are_refused() {
        let (peer, relay) = exchange();
        let mut sealed = peer.seal(b"payload 1", b"delta");
        assert_eq!(relay.open(b"payload 2", &sealed), Err(SealError::Forged));
        sealed[10] ^= 1;
        assert_eq!(relay.open(b"payload 1", &sealed), Err(SealError::Forged));
        assert_eq!(
            relay.open(b"payload 1", &sealed[..10]),
            Err(SealError::Short(10))
        );
    }

    #[test]
    fn a_forged_or_misdirected_accept_is_refused() {
        let relay = Identity::from_seed([7; 32]);
        let mallory = Identity::from_seed([9; 32]);
        let (offerer, offer) = Offerer::new().unwrap();
        let (signed, _) = accept(&mallory, [1; 32], &offer).unwrap();
        assert!(matches!(
            offerer.finish(&[1; 32], relay.public_key(), &signed),
            Err(SealError::Signature(_))
        ));
        let (offerer, offer) = Offerer::new().unwrap();
        let (signed, _) = accept(&relay, [2; 32], &offer).unwrap();
        assert_eq!(
            offerer
                .finish(&[1; 32], relay.public_key(), &signed)
                .unwrap_err(),
            SealError::OtherOffer
        );
    }

    #[test]
    fn malformed_offers_are_refused() {
        let relay = Identity::from_seed([7; 32]);
        let (_, mut offer) = Offerer::new().unwrap();
        offer.kem_key.pop();
        assert_eq!(
            accept(&relay, [0; 32], &offer).unwrap_err(),
            SealError::BadKemKey
        );
        let (_, mut offer) = Offerer::new().unwrap();
        offer.x25519 = [0; 32];
        assert_eq!(
            accept(&relay, [0; 32], &offer).unwrap_err(),
            SealError::LowOrder
        );
        // A key whose coefficients are not reduced mod q fails FIPS 203's modulus check.
        let (_, mut offer) = Offerer::new().unwrap();
        offer.kem_key[..384].fill(0xff);
        assert_eq!(
            accept(&relay, [0; 32], &offer).unwrap_err(),
            SealError::BadKemKey
        );
    }
}
