//! An edge relay's link to its federation's root: the same session a peer has (bootstrap,
//! admission, `Join`, session keys, mending after a root restart), joined as
//! [`Role::Edge`]. Over it the edge follows the root's announcements, fetches each round's θ
//! once, and hands the root its own peers' joins, updates and reveals
//! ([`ClientToRelay::Forward`]). The relay crate drives it (`swarmtrain-relay serve
//! --upstream`); see docs/protocol.md, "Federation".

use std::sync::Arc;

use swarmtrain_shared::protocol::{
    self, ClientToRelay, Delegation, EdgeReport, Member, ParamsHash, RelayToClient, Role,
    RoundAnnouncement, RunSpec, Submission,
};
use swarmtrain_shared::{Identity, Signed};

use crate::peer::{PeerConfig, PeerError, Session};
use crate::rpc::RpcError;

/// A joined edge ↔ root session for one run.
pub struct EdgeLink {
    session: Session,
    /// Forwards go one at a time: each is longer than a frame (two signed envelopes), so it
    /// travels in parts, and the root reassembles one message at a time per connection.
    forwarding: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for EdgeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeLink")
            .field("root", &self.session.address)
            .field("run", &self.session.spec.run_id)
            .finish_non_exhaustive()
    }
}

impl EdgeLink {
    /// Joins run `run_id` of the root relay at `root_url` (its HTTP base URL) as an edge signing
    /// with `identity` (the edge relay's own). Fails when the root refuses, or welcomes the edge
    /// without a delegation (a root of another protocol version).
    pub async fn join(
        root_url: &str,
        run_id: &str,
        identity: &Identity,
    ) -> Result<Self, PeerError> {
        let config = PeerConfig {
            relay_url: root_url.to_owned(),
            run_id: Some(run_id.to_owned()),
            transport: None,
            identity_seed: identity.seed(),
            backend: "edge".into(),
            max_rounds: None,
            sample_len: 0,
            stop: Arc::default(),
            pause: Arc::default(),
            max_retries: None,
            direct_peers: 0,
            pin_relay: true,
            ice_servers: Vec::new(),
        };
        let (session, _) = Session::join(&config, root_url, identity, Role::Edge).await?;
        if session.delegation.is_none() {
            return Err(PeerError::Refused(
                "the root welcomed this edge without a delegation".into(),
            ));
        }
        Ok(Self {
            session,
            forwarding: tokio::sync::Mutex::new(()),
        })
    }

    /// The root's HTTP base URL, as the edge was given it.
    pub fn root_url(&self) -> &str {
        &self.session.relay_url
    }

    /// The run as the root specifies it.
    pub fn spec(&self) -> &RunSpec {
        &self.session.spec
    }

    /// The root's key, which signs the run's announcements and the delegation.
    pub fn root_key(&self) -> &[u8] {
        self.session.welcome_round.public_key.as_slice()
    }

    /// The round the root announced when the edge joined, as the root signed it.
    pub fn welcome_round(&self) -> &Signed<RoundAnnouncement> {
        &self.session.welcome_round
    }

    /// The root's statement that this edge's key speaks for the run, which the edge's own
    /// peers' `Welcome` carries.
    pub fn delegation(&self) -> Option<&Signed<Delegation>> {
        self.session.delegation.as_ref()
    }

    /// The first round after `after`, as the root signed it (verified), by long poll.
    pub async fn await_round(
        &self,
        after: u64,
    ) -> Result<(Signed<RoundAnnouncement>, RoundAnnouncement), PeerError> {
        self.session.poll_signed(after).await
    }

    /// θ of `round` from the root, checked against its hash.
    pub async fn fetch_params(&self, round: u64, hash: ParamsHash) -> Result<Vec<f32>, PeerError> {
        Ok(self.session.fetch_params(round, hash).await?.0)
    }

    /// Hands the root one of the edge's peers' messages (its signed envelope and the opened
    /// payload) and returns the root's answer to it. A refusal of the forward itself (the edge's
    /// session, after mending what can be mended) is an error.
    pub async fn forward(&self, submission: &Submission) -> Result<RelayToClient, PeerError> {
        let payload = protocol::encode_submission(submission)
            .map_err(|e| PeerError::Rpc(RpcError::Wire(e)))?;
        let forward = ClientToRelay::Forward {
            run_id: self.session.spec.run_id.clone(),
        };
        let _turn = self.forwarding.lock().await;
        match self.session.send_mending(forward, payload).await? {
            RelayToClient::Forwarded(answer) => Ok(*answer),
            RelayToClient::Rejected { kind, reason } => Err(PeerError::Refused(format!(
                "the root refused the forward ({kind}): {reason}"
            ))),
            _ => Err(PeerError::Unexpected("forward")),
        }
    }

    /// Tells the root where clients reach this edge and its load; returns the federation's
    /// relays as the root lists them.
    pub async fn report(&self, report: EdgeReport) -> Result<Vec<Member>, PeerError> {
        match self
            .session
            .send_mending(ClientToRelay::Report(report), Vec::new())
            .await?
        {
            RelayToClient::Federation(members) => Ok(members),
            RelayToClient::Rejected { kind, reason } => Err(PeerError::Refused(format!(
                "the root refused the report ({kind}): {reason}"
            ))),
            _ => Err(PeerError::Unexpected("report")),
        }
    }
}
