//! ML-DSA-65 identities and signed envelopes.
//!
//! A peer's identity is an ML-DSA-65 key pair derived from a 32-byte seed; its [`PeerKey`] is
//! the BLAKE3 hash of the encoded verifying key. The same seed also gives the peer's libp2p
//! key ([`Identity::network_secret`]), so one identity is one libp2p peer ID across
//! reconnects. The seed and everything derived from it are zeroized when dropped. Every message that changes state travels as a
//! [`Signed<T>`], and [`Signed::verify_and_decode`] is the only way to turn its bytes into a `T`:
//! the signature is checked before a single byte of the body is parsed.

use core::fmt;
use core::marker::PhantomData;

use ml_dsa::{EncodedVerifyingKey, Keypair, MlDsa65, Seed, Signature, SigningKey, VerifyingKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// The FIPS 204 context string each signed type is signed under (at most 255 bytes): a
/// signature made for one type never verifies as another, nor outside swarmtrain.
pub trait SigningContext {
    const CONTEXT: &'static [u8];
}

/// Encoded ML-DSA-65 verifying key length in bytes.
pub const PUBLIC_KEY_BYTES: usize = 1952;
/// Encoded ML-DSA-65 signature length in bytes.
pub const SIGNATURE_BYTES: usize = 3309;

/// Why a signed message was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("public key has {0} bytes, expected {PUBLIC_KEY_BYTES}")]
    PublicKeyLength(usize),
    #[error("signature is malformed")]
    MalformedSignature,
    #[error("signature does not verify")]
    BadSignature,
    #[error("signed by {got}, expected {expected}")]
    WrongSigner { expected: PeerKey, got: PeerKey },
    #[error("signed body does not decode: {0}")]
    Decode(String),
    #[error("could not encode message: {0}")]
    Encode(String),
}

/// A peer's stable name: BLAKE3 of its encoded ML-DSA-65 verifying key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PeerKey(pub [u8; 32]);

impl PeerKey {
    pub fn from_public_key(public_key: &[u8]) -> Self {
        Self(*blake3::hash(public_key).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The first 8 bytes, for logs.
    pub fn short(&self) -> String {
        self.to_hex()[..16].to_owned()
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({})", self.short())
    }
}

/// An ML-DSA-65 signing identity. Deterministic: the same seed gives the same keys. The seed
/// and the signing key are zeroized on drop; `Debug` shows only the peer key.
pub struct Identity {
    seed: Zeroizing<[u8; 32]>,
    signing: SigningKey<MlDsa65>,
    public_key: Vec<u8>,
    peer: PeerKey,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Derives the key pair from a 32-byte secret seed (FIPS 204 ML-DSA.KeyGen_internal).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        let signing = SigningKey::<MlDsa65>::from_seed(&Seed::from(*seed));
        let public_key = signing.verifying_key().encode().to_vec();
        let peer = PeerKey::from_public_key(&public_key);
        Self {
            seed,
            signing,
            public_key,
            peer,
        }
    }

    /// The secret seed, for persisting the identity (IndexedDB, or a 0600 key file).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        self.seed.clone()
    }

    /// The secret of this identity's Ed25519 libp2p key, derived from the seed (BLAKE3 in
    /// key-derivation mode, its own context), so a peer keeps its libp2p peer ID across
    /// connections and the relay can hold one identity to one peer ID.
    pub fn network_secret(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(blake3::derive_key(
            "swarmtrain libp2p ed25519 key v1",
            self.seed.as_slice(),
        ))
    }

    pub fn peer(&self) -> PeerKey {
        self.peer
    }

    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Serializes `message` with postcard and signs the bytes under `T`'s context
    /// ([`SigningContext`]; FIPS 204's deterministic ML-DSA.Sign with a context string).
    pub fn sign<T: Serialize + SigningContext>(
        &self,
        message: &T,
    ) -> Result<Signed<T>, CryptoError> {
        let body =
            postcard::to_allocvec(message).map_err(|e| CryptoError::Encode(e.to_string()))?;
        let signature: Signature<MlDsa65> = self
            .signing
            .expanded_key()
            .sign_deterministic(&body, T::CONTEXT)
            .map_err(|_| CryptoError::Encode("the signing context is too long".into()))?;
        Ok(Signed {
            public_key: self.public_key.clone(),
            body,
            signature: signature.encode().to_vec(),
            _message: PhantomData,
        })
    }
}

/// Lowercase hex of a 32-byte identity seed, the form in which seeds are stored.
pub fn seed_to_hex(seed: &[u8; 32]) -> Zeroizing<String> {
    Zeroizing::new(seed.iter().map(|b| format!("{b:02x}")).collect())
}

/// Parses 64 hex digits (surrounding whitespace allowed) back into a seed.
pub fn seed_from_hex(hex: &str) -> Option<Zeroizing<[u8; 32]>> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    for (i, byte) in seed.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(seed)
}

/// A postcard-encoded `T` with the signer's public key and an ML-DSA-65 signature over it.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<T> {
    pub public_key: Vec<u8>,
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
    #[serde(skip)]
    _message: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            public_key: self.public_key.clone(),
            body: self.body.clone(),
            signature: self.signature.clone(),
            _message: PhantomData,
        }
    }
}

/// Equal when the key, body and signature bytes are.
impl<T> PartialEq for Signed<T> {
    fn eq(&self, other: &Self) -> bool {
        self.public_key == other.public_key
            && self.body == other.body
            && self.signature == other.signature
    }
}

impl<T> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("signer", &PeerKey::from_public_key(&self.public_key))
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl<T> Signed<T> {
    /// The same signed message without the signer's public key, for receivers that already
    /// hold that key (1,952 bytes less). [`Self::verify_with_key`] checks it.
    pub fn without_key(&self) -> Self {
        Self {
            public_key: Vec::new(),
            body: self.body.clone(),
            signature: self.signature.clone(),
            _message: PhantomData,
        }
    }
}

impl<T: DeserializeOwned + SigningContext> Signed<T> {
    /// Checks the signature (under `T`'s context), then decodes the body. Returns the signer and the message.
    pub fn verify_and_decode(&self) -> Result<(PeerKey, T), CryptoError> {
        let message = verify_body(&self.public_key, &self.body, &self.signature)?;
        Ok((PeerKey::from_public_key(&self.public_key), message))
    }

    /// As [`Self::verify_and_decode`], and the signer must be `expected`.
    pub fn verify_from(&self, expected: &PeerKey) -> Result<T, CryptoError> {
        let got = PeerKey::from_public_key(&self.public_key);
        if &got != expected {
            return Err(CryptoError::WrongSigner {
                expected: *expected,
                got,
            });
        }
        self.verify_and_decode().map(|(_, message)| message)
    }

    /// Checks that `public_key` signed this message, which may have been sent
    /// [without its key](Self::without_key); a key it does carry must be `public_key`.
    pub fn verify_with_key(&self, public_key: &[u8]) -> Result<T, CryptoError> {
        if !self.public_key.is_empty() && self.public_key != public_key {
            return Err(CryptoError::WrongSigner {
                expected: PeerKey::from_public_key(public_key),
                got: PeerKey::from_public_key(&self.public_key),
            });
        }
        verify_body(public_key, &self.body, &self.signature)
    }
}

/// Checks an ML-DSA-65 signature by `public_key` over `body` under `T`'s context, then
/// decodes `body`.
fn verify_body<T: DeserializeOwned + SigningContext>(
    public_key: &[u8],
    body: &[u8],
    signature: &[u8],
) -> Result<T, CryptoError> {
    let encoded = EncodedVerifyingKey::<MlDsa65>::try_from(public_key)
        .map_err(|_| CryptoError::PublicKeyLength(public_key.len()))?;
    let key = VerifyingKey::<MlDsa65>::decode(&encoded);
    let signature =
        Signature::<MlDsa65>::try_from(signature).map_err(|_| CryptoError::MalformedSignature)?;
    if !key.verify_with_context(body, T::CONTEXT, &signature) {
        return Err(CryptoError::BadSignature);
    }
    postcard::from_bytes(body).map_err(|e| CryptoError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Msg {
        round: u64,
        payload: Vec<u8>,
    }

    impl SigningContext for Msg {
        const CONTEXT: &'static [u8] = b"swarmtrain/test-msg";
    }

    /// The same fields as `Msg`, so the same body bytes, under another context.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Other {
        round: u64,
        payload: Vec<u8>,
    }

    impl SigningContext for Other {
        const CONTEXT: &'static [u8] = b"swarmtrain/test-other";
    }

    #[test]
    fn a_signature_for_one_type_never_verifies_as_another_with_the_same_bytes() {
        let (_, msg) = signed();
        let as_other: Signed<Other> = Signed {
            public_key: msg.public_key.clone(),
            body: msg.body.clone(),
            signature: msg.signature.clone(),
            _message: PhantomData,
        };
        assert_eq!(
            as_other.verify_and_decode().map(|_| ()),
            Err(CryptoError::BadSignature)
        );
        assert!(msg.verify_and_decode().is_ok());
    }

    fn signed() -> (Identity, Signed<Msg>) {
        let id = Identity::from_seed([7; 32]);
        let msg = id
            .sign(&Msg {
                round: 3,
                payload: vec![1, 2, 3, 4],
            })
            .expect("sign");
        (id, msg)
    }

    #[test]
    fn signed_message_round_trips_and_names_its_signer() {
        let (id, msg) = signed();
        assert_eq!(msg.public_key.len(), PUBLIC_KEY_BYTES);
        assert_eq!(msg.signature.len(), SIGNATURE_BYTES);
        let (peer, decoded) = msg.verify_and_decode().expect("verifies");
        assert_eq!(peer, id.peer());
        assert_eq!(
            decoded,
            Msg {
                round: 3,
                payload: vec![1, 2, 3, 4]
            }
        );
        assert_eq!(msg.verify_from(&id.peer()).expect("from"), decoded);
    }

    #[test]
    fn a_message_sent_without_its_key_verifies_only_with_the_signers_key() {
        let (id, msg) = signed();
        let bare = msg.without_key();
        assert!(bare.public_key.is_empty());
        assert_eq!(
            bare.verify_with_key(&msg.public_key)
                .expect("verifies")
                .round,
            3
        );
        assert_eq!(
            msg.verify_with_key(&msg.public_key)
                .expect("with its key too")
                .round,
            3
        );
        let other = Identity::from_seed([8; 32]);
        let other_key = other
            .sign(&Msg {
                round: 0,
                payload: vec![],
            })
            .expect("sign")
            .public_key;
        assert!(matches!(
            bare.verify_with_key(&other_key),
            Err(CryptoError::BadSignature)
        ));
        assert!(matches!(
            msg.verify_with_key(&other_key),
            Err(CryptoError::WrongSigner { .. })
        ));
        assert!(matches!(
            bare.verify_with_key(&[1, 2, 3]),
            Err(CryptoError::PublicKeyLength(3))
        ));
        assert!(
            bare.verify_and_decode().is_err(),
            "no key, nothing to verify against"
        );
        let _ = id;
    }

    #[test]
    fn seeds_round_trip_through_hex_and_bad_hex_is_refused() {
        let seed: [u8; 32] = core::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(
            seed_from_hex(&format!(" {}\n", *seed_to_hex(&seed))).as_deref(),
            Some(&seed)
        );
        assert_eq!(seed_from_hex("abc"), None);
        assert_eq!(seed_from_hex(&"zz".repeat(32)), None);
        assert_eq!(seed_from_hex(&"é".repeat(32)), None);
    }

    #[test]
    fn identity_is_deterministic_in_its_seed() {
        assert_eq!(
            Identity::from_seed([1; 32]).peer(),
            Identity::from_seed([1; 32]).peer()
        );
        assert_ne!(
            Identity::from_seed([1; 32]).peer(),
            Identity::from_seed([2; 32]).peer()
        );
        let one = Identity::from_seed([1; 32]);
        assert_eq!(
            *one.network_secret(),
            *Identity::from_seed([1; 32]).network_secret()
        );
        assert_ne!(*one.network_secret(), *one.seed(), "a key of its own");
        assert!(!format!("{one:?}").contains(&*seed_to_hex(&one.seed())));
    }

    #[test]
    fn every_flipped_bit_in_the_body_is_rejected() {
        let (_, msg) = signed();
        for bit in 0..msg.body.len() * 8 {
            let mut forged = msg.clone();
            forged.body[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                forged.verify_and_decode().unwrap_err(),
                CryptoError::BadSignature,
                "bit {bit}"
            );
        }
    }

    #[test]
    fn flipped_bits_in_the_signature_are_rejected() {
        let (_, msg) = signed();
        for byte in [0, 1, 100, 2000, SIGNATURE_BYTES - 1] {
            let mut forged = msg.clone();
            forged.signature[byte] ^= 0x10;
            let err = forged.verify_and_decode().unwrap_err();
            assert!(
                matches!(
                    err,
                    CryptoError::BadSignature | CryptoError::MalformedSignature
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn another_key_or_truncation_is_rejected() {
        let (_, msg) = signed();
        let other = Identity::from_seed([8; 32]);
        let mut swapped = msg.clone();
        swapped.public_key = other.public_key().to_vec();
        assert_eq!(
            swapped.verify_and_decode().unwrap_err(),
            CryptoError::BadSignature
        );
        assert!(matches!(
            msg.verify_from(&other.peer()),
            Err(CryptoError::WrongSigner { .. })
        ));

        let mut short_key = msg.clone();
        short_key.public_key.pop();
        assert_eq!(
            short_key.verify_and_decode().unwrap_err(),
            CryptoError::PublicKeyLength(PUBLIC_KEY_BYTES - 1)
        );
        let mut short_sig = msg.clone();
        short_sig.signature.truncate(100);
        assert_eq!(
            short_sig.verify_and_decode().unwrap_err(),
            CryptoError::MalformedSignature
        );
    }
}
