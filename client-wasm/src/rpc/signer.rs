//! Signing and key agreement for one connection to the relay: every message goes in a fresh
//! [`Envelope`] (this connection's peer ID, the next sequence number, an expiry on the relay's
//! clock) signed with the peer's ML-DSA identity, and, once ML-KEM-768 + X25519 session keys
//! are agreed ([`swarmtrain_shared::seal`]), update payloads and θ chunks are sealed.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{
    ClientToRelay, ENVELOPE_VALIDITY_MS, Envelope, RelayToClient, Submission,
};
use swarmtrain_shared::seal::{self, Offerer, SessionKeys};

use super::{RelayClient, RpcError, unexpected, unix_ms};

/// The session keys of the connection to the relay, shared with its event loop.
pub(super) type SharedKeys = Arc<Mutex<Option<Arc<SessionKeys>>>>;

/// Signs this connection's envelopes.
#[derive(Debug)]
pub(super) struct Signer {
    identity: Identity,
    peer_id: PeerId,
    /// The next sequence number: starts at the clock in µs, so a peer that reconnects with the
    /// same identity continues above the numbers it used before.
    seq: AtomicU64,
    /// The relay's clock minus ours, in ms.
    clock_offset_ms: AtomicI64,
    /// The session keys agreed with the relay ([`RelayClient::agree_keys`]), which seal update
    /// payloads and open θ chunks. They belong to one libp2p connection: the event loop forgets
    /// them when that connection closes (a later request redials, and keys are agreed again).
    keys: SharedKeys,
}

impl Signer {
    pub(super) fn new(identity: &Identity, peer_id: PeerId, keys: SharedKeys) -> Self {
        let micros = web_time::SystemTime::now()
            .duration_since(web_time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Self {
            identity: Identity::from_seed(*identity.seed()),
            peer_id,
            seq: AtomicU64::new(micros),
            clock_offset_ms: AtomicI64::new(0),
            keys,
        }
    }

    pub(super) fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub(super) fn identity(&self) -> &Identity {
        &self.identity
    }
}

impl RelayClient {
    /// Tells the handle the relay's clock (Unix ms, as `/api/bootstrap` reports it), so that
    /// envelope expiries are on the relay's clock whatever this machine's says.
    pub fn set_relay_clock(&self, relay_unix_ms: u64) {
        let offset = relay_unix_ms as i64 - unix_ms() as i64;
        self.signer.clock_offset_ms.store(offset, Ordering::Relaxed);
    }

    /// A fresh envelope for `message`: this connection, the next sequence number, and an expiry
    /// [`ENVELOPE_VALIDITY_MS`] from now on the relay's clock.
    pub fn envelope(&self, message: ClientToRelay) -> Envelope {
        let now = unix_ms() as i64 + self.signer.clock_offset_ms.load(Ordering::Relaxed);
        Envelope {
            peer_id: self.signer.peer_id.to_bytes(),
            seq: self.signer.seq.fetch_add(1, Ordering::Relaxed),
            expires_ms: now.max(0) as u64 + ENVELOPE_VALIDITY_MS,
            message,
        }
    }

    /// Signs `message` in a fresh envelope, sends it with `payload` (an update's encoded Δ,
    /// else empty; sealed once keys are agreed) and waits for the relay's answer.
    pub async fn send(
        &self,
        message: ClientToRelay,
        payload: Vec<u8>,
    ) -> Result<RelayToClient, RpcError> {
        let envelope = self.envelope(message);
        let payload = match self.keys() {
            Some(keys) if !payload.is_empty() => {
                keys.seal(&seal::payload_context(envelope.seq), &payload)
            }
            _ => payload,
        };
        let signed = self
            .signer
            .identity
            .sign(&envelope)
            .map_err(|e| RpcError::Sign(e.to_string()))?;
        self.submit(&Submission { signed, payload }).await
    }

    /// The session keys agreed with the relay, if any.
    pub fn keys(&self) -> Option<Arc<SessionKeys>> {
        self.signer.keys.lock().ok().and_then(|k| k.clone())
    }

    /// Agrees ML-KEM-768 + X25519 session keys with the relay ([`swarmtrain_shared::seal`]),
    /// whose ML-DSA key `relay_key` must sign its half; from then on update payloads and θ
    /// chunks on this connection are sealed. The relay answers only after a `Join`.
    pub async fn agree_keys(&self, relay_key: &[u8]) -> Result<(), RpcError> {
        let (offerer, offer) = Offerer::new()?;
        let signed = self
            .signer
            .identity
            .sign(&self.envelope(ClientToRelay::KeyOffer(offer)))
            .map_err(|e| RpcError::Sign(e.to_string()))?;
        let digest = seal::digest_signed(&signed);
        let accept = match self
            .submit(&Submission {
                signed,
                payload: Vec::new(),
            })
            .await?
        {
            RelayToClient::KeyAccept(accept) => accept,
            RelayToClient::Rejected { reason, .. } => return Err(RpcError::Refused(reason)),
            _ => return Err(unexpected("a key accept")),
        };
        let keys = offerer.finish(&digest, relay_key, &accept)?;
        let confirm = ClientToRelay::KeyConfirm {
            transcript: keys.transcript(),
        };
        match self.send(confirm, Vec::new()).await? {
            RelayToClient::KeysAgreed => {}
            RelayToClient::Rejected { reason, .. } => return Err(RpcError::Refused(reason)),
            _ => return Err(unexpected("keys agreed")),
        }
        if let Ok(mut slot) = self.signer.keys.lock() {
            *slot = Some(Arc::new(keys));
        }
        Ok(())
    }
}
