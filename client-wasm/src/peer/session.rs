//! One connection's worth of talking to the relay: bootstrap and admission, the `Join`, key
//! agreement, the direct links to other browsers, each round's announcement, θ and data, and
//! the update, reveal and audit messages (mended and sent again when the relay asks).

use std::time::Duration;

use serde::Deserialize;
use swarmtrain_net::http::{Bootstrap, url};
use swarmtrain_shared::admission::{Admission, AdmissionTerms, search_proof_of_work};
use swarmtrain_shared::data::{self, DigitsSet};
use swarmtrain_shared::protocol::{
    self, Capabilities, ClientToRelay, Join, PROTOCOL_VERSION, ParamsHash, PayloadRef,
    RelayToClient, Reveal, Role, RoundAnnouncement, RunSpec, Update,
};
use swarmtrain_shared::{Identity, Signed};
use web_time::Instant;

use super::{
    DirectPeer, MAX_TRIES, POLL_AFTER, PeerConfig, PeerError, PeerEvent, ThetaPeer, retry_delay,
};
use crate::platform;
use crate::rpc::RelayClient;

/// How long a browser waits for its links after joining before it fetches θ…
const DIRECT_WAIT: Duration = Duration::from_secs(3);
/// …and how long for the rest once the first is up.
const LINK_STRAGGLER: Duration = Duration::from_secs(1);

/// How a round's announcement reached a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Announced {
    /// In the relay's answer to joining.
    Welcome,
    /// By gossip: from the relay itself (None) or forwarded by this linked browser.
    Gossip(Option<libp2p::PeerId>),
    /// By the long poll.
    Poll,
}

impl Announced {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::Gossip(_) => "gossip",
            Self::Poll => "poll",
        }
    }
}

/// Shuffles `items` (Fisher–Yates with the platform's random source; left as is without one).
fn shuffle<T>(items: &mut [T]) {
    let mut random = vec![0u8; items.len() * 4];
    if getrandom::fill(&mut random).is_err() {
        return;
    }
    for i in (1..items.len()).rev() {
        let r = u32::from_le_bytes(random[i * 4..i * 4 + 4].try_into().unwrap_or_default());
        items.swap(i, r as usize % (i + 1));
    }
}

/// `GET {relay_url}api/bootstrap`, for `peer` (its peer key: the relay mints TURN credentials
/// for it).
pub async fn fetch_bootstrap(relay_url: &str, peer: Option<&str>) -> Result<Bootstrap, PeerError> {
    let path = match peer {
        Some(peer) => format!("api/bootstrap?peer={peer}"),
        None => "api/bootstrap".to_owned(),
    };
    let raw = platform::http_get(&url(relay_url, &path))
        .await
        .map_err(PeerError::Bootstrap)?;
    serde_json::from_slice(&raw).map_err(|e| PeerError::Bootstrap(e.to_string()))
}

/// Solves the run's proof-of-work puzzle for `identity` when its terms ask for one, yielding
/// to the page between batches of hashes.
async fn proof_of_work(
    terms: Option<&AdmissionTerms>,
    identity: &Identity,
) -> Result<Option<u64>, PeerError> {
    let Some(terms) = terms.filter(|t| t.policy == "proof-of-work") else {
        return Ok(None);
    };
    let bad = || {
        PeerError::Bootstrap(format!(
            "the relay's admission terms are malformed: {terms:?}"
        ))
    };
    let bits = terms
        .bits
        .filter(|b| *b <= Admission::MAX_BITS)
        .ok_or_else(bad)?;
    let challenge = terms
        .challenge
        .as_deref()
        .and_then(|hex| blake3::Hash::from_hex(hex).ok())
        .ok_or_else(bad)?;
    const BATCH: u64 = 1 << 14;
    let mut start = 0u64;
    loop {
        let range = start..start.saturating_add(BATCH);
        if let Some(nonce) =
            search_proof_of_work(challenge.as_bytes(), &identity.peer(), bits, range)
        {
            return Ok(Some(nonce));
        }
        start = start.checked_add(BATCH).ok_or_else(bad)?;
        platform::yield_now().await;
    }
}

/// A joined session with the relay.
pub(crate) struct Session {
    pub(crate) client: RelayClient,
    pub(crate) transport: String,
    /// The relay address this session dialed.
    pub(crate) address: String,
    /// The `Join` this session sent, to send again should the relay have forgotten us.
    join: ClientToRelay,
    /// The relay's ML-DSA-65 public key, which signs every announcement (a federation's root's).
    relay_key: Vec<u8>,
    /// The key that signs the relay's half of key exchanges: `relay_key`, or the key of the
    /// edge relay the root delegated the run to ([`protocol::Welcome::session_key`]).
    session_key: Vec<u8>,
    /// The round the `Welcome` announced, as signed, and the root's delegation to the relay
    /// when it is an edge (what an edge relay's own link to its root passes on).
    pub(crate) welcome_round: Signed<RoundAnnouncement>,
    pub(crate) delegation: Option<Signed<protocol::Delegation>>,
    pub(crate) relay_url: String,
    /// The relays of the relay's federation, as its bootstrap listed them (empty: a lone relay).
    pub(crate) federation: Vec<protocol::Member>,
    pub(crate) spec: RunSpec,
    /// This peer's data slot (text runs).
    slot: u32,
}

impl Session {
    /// Dials the relay at `relay_url` (`config`'s, or another relay of its federation) and
    /// joins `config`'s run there as `role`: admission, the `Welcome`, session keys, and the
    /// run's announcements by gossip.
    pub(crate) async fn join(
        config: &PeerConfig,
        relay_url: &str,
        identity: &Identity,
        role: Role,
    ) -> Result<(Self, RoundAnnouncement), PeerError> {
        let bootstrap = fetch_bootstrap(relay_url, Some(&identity.peer().to_hex())).await?;
        let wanted: Vec<&str> = match &config.transport {
            Some(t) => vec![t.as_str()],
            None => platform::TRANSPORTS.to_vec(),
        };
        let (transport, address) = wanted
            .iter()
            .find_map(|t| {
                bootstrap
                    .addresses
                    .get(*t)
                    .and_then(|a| a.iter().find(|a| platform::can_dial(a)))
                    .map(|a| ((*t).to_owned(), a))
            })
            .ok_or_else(|| {
                PeerError::Bootstrap(format!("relay offers no {} address", wanted.join(" or ")))
            })?;
        let dialed = address.clone();
        let address = address
            .parse()
            .map_err(|e| PeerError::Bootstrap(format!("{address}: {e}")))?;
        // The embedder's ICE servers, else the relay operator's (with fresh TURN credentials
        // on every join).
        let ice_servers = if config.ice_servers.is_empty() {
            bootstrap.ice_servers.clone()
        } else {
            config.ice_servers.clone()
        };
        let client = RelayClient::connect_with(address, identity, ice_servers)?;
        if bootstrap.time_ms > 0 {
            client.set_relay_clock(bootstrap.time_ms);
        }
        let federation = bootstrap.federation;
        let run_id = config.run_id.clone().unwrap_or(bootstrap.run_id);
        let proof_of_work = proof_of_work(bootstrap.admission.get(&run_id), identity).await?;
        let join = ClientToRelay::Join(Join {
            version: PROTOCOL_VERSION,
            run_id,
            capabilities: Capabilities {
                backend: config.backend.clone(),
                platform: platform::platform(),
            },
            role,
            proof_of_work,
        });
        let welcome = match client.send(join.clone(), Vec::new()).await? {
            RelayToClient::Welcome(welcome) => *welcome,
            RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                return Err(PeerError::Busy(reason));
            }
            RelayToClient::Rejected { reason, .. } => return Err(PeerError::Refused(reason)),
            _ => return Err(PeerError::Unexpected("join")),
        };
        let relay_key = welcome.relay_key().to_vec();
        // An edge relay joining its root is handed its own delegation (to show its peers); it
        // agrees keys with the root itself.
        let session_key = match role {
            Role::Edge => relay_key.clone(),
            _ => welcome
                .session_key()
                .map_err(|e| PeerError::Announcement(format!("the relay's delegation: {e}")))?,
        };
        // From here on, the update payloads and θ chunks on this connection are sealed.
        client.agree_keys(&session_key).await?;
        welcome
            .spec
            .validate()
            .map_err(|e| PeerError::BadSpec(e.to_string()))?;
        if welcome.slot >= welcome.spec.data.n_shards {
            return Err(PeerError::BadSpec(format!(
                "slot {} of {}",
                welcome.slot, welcome.spec.data.n_shards
            )));
        }
        let session = Self {
            slot: welcome.slot,
            client,
            transport,
            address: dialed,
            join,
            relay_key,
            session_key,
            welcome_round: welcome.round.clone(),
            delegation: welcome.delegation.clone(),
            relay_url: relay_url.to_owned(),
            federation,
            spec: welcome.spec,
        };
        let announcement = session.verify(&welcome.round)?;
        // Announcements arrive by gossip; the long poll is the fallback.
        session
            .client
            .subscribe(protocol::rounds_topic(&session.spec.run_id))
            .await?;
        Ok((session, announcement))
    }

    /// Browsers: takes WebRTC connections from other browsers through the relay, and dials up
    /// to `direct_peers` of those the relay lists as reachable (`/api/reachable`). Failures
    /// only cost the direct links: training goes on through the relay.
    pub(crate) async fn link_browsers(&self, config: &PeerConfig) {
        if config.direct_peers == 0 {
            return;
        }
        if self.client.listen_direct().await.is_err() {
            return;
        }
        #[derive(Deserialize)]
        struct Reachable {
            peers: Vec<String>,
        }
        // Up to `direct_peers` of the 32 newest, at random: not only the newest, which have
        // often not fetched the round's θ yet, and no browser linked to by every joiner.
        let listed = match platform::http_get(&url(&self.relay_url, "api/reachable?limit=32")).await
        {
            Ok(body) => serde_json::from_slice::<Reachable>(&body).map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let listed = match listed {
            Ok(listed) => listed.peers,
            Err(e) => {
                tracing::info!("could not list reachable browsers: {e}");
                return;
            }
        };
        let me = self.client.peer_id();
        let mut peers: Vec<libp2p::PeerId> = listed
            .iter()
            .filter_map(|p| p.parse().ok())
            .filter(|p| *p != me)
            .collect();
        shuffle(&mut peers);
        peers.truncate(config.direct_peers);
        if peers.is_empty() || self.client.dial_direct(peers.clone()).await.is_err() {
            return;
        }
        // Give the links a moment, so that this round's θ can come from them: until all are up,
        // at most DIRECT_WAIT, and at most LINK_STRAGGLER after the first.
        let dialed = peers.len();
        let mut info = self.client.watch_info();
        let waited = Instant::now();
        let mut first = None;
        loop {
            let linked = info.borrow_and_update().direct_peers.len();
            if linked >= dialed {
                return;
            }
            let mut left = DIRECT_WAIT.saturating_sub(waited.elapsed());
            if linked > 0 {
                let since = first.get_or_insert_with(Instant::now).elapsed();
                left = left.min(LINK_STRAGGLER.saturating_sub(since));
            }
            let changed = info.changed();
            let timeout = platform::sleep(left);
            futures::pin_mut!(changed, timeout);
            match futures::future::select(changed, timeout).await {
                futures::future::Either::Left((Ok(()), _)) => {}
                // Out of time, or the connection ended.
                _ => return,
            }
        }
    }

    /// The direct links as an event, when they changed since `last`.
    pub(crate) fn direct_event(
        &self,
        last: &mut Option<(Vec<DirectPeer>, Option<String>)>,
    ) -> Option<PeerEvent> {
        let info = self.client.relay_info();
        let mut peers: Vec<DirectPeer> = info
            .direct_peers
            .iter()
            .map(|p| DirectPeer {
                peer: p.to_string(),
                rtt_ms: info.direct_rtt.get(p).map(|d| d.as_secs_f64() * 1e3),
                path: crate::webrtc::path_of(p),
            })
            .collect();
        peers.sort_by(|a, b| a.peer.cmp(&b.peer));
        let now = (peers, info.direct_error);
        if last.as_ref() == Some(&now) || (last.is_none() && now.0.is_empty() && now.1.is_none()) {
            return None;
        }
        *last = Some(now.clone());
        Some(PeerEvent::Direct {
            peers: now.0,
            error: now.1,
        })
    }

    pub(crate) fn verify(
        &self,
        signed: &Signed<RoundAnnouncement>,
    ) -> Result<RoundAnnouncement, PeerError> {
        let announcement = signed
            .verify_with_key(&self.relay_key)
            .map_err(|e| PeerError::Announcement(e.to_string()))?;
        if announcement.run_id != self.spec.run_id {
            return Err(PeerError::Announcement(format!(
                "announcement is for run {:?}",
                announcement.run_id
            )));
        }
        Ok(announcement)
    }

    /// Sends `message` (with `payload`, for an update) and returns the relay's answer, mending
    /// what the relay's answer says can be mended, up to [`MAX_TRIES`] sends: a relay that no
    /// longer knows this peer (it restarted: `not_joined`) gets the `Join` again; a connection
    /// without session keys (a redial: `not_sealed`, `unknown_session`) agrees them again; a
    /// busy relay (`*_busy`) is asked again after [`retry_delay`]. Busy is never final.
    pub(crate) async fn send_mending(
        &self,
        message: ClientToRelay,
        payload: Vec<u8>,
    ) -> Result<RelayToClient, PeerError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let answer = self.client.send(message.clone(), payload.clone()).await?;
            let RelayToClient::Rejected { kind, reason } = &answer else {
                return Ok(answer);
            };
            if tries >= MAX_TRIES {
                return Ok(answer);
            }
            match kind.as_str() {
                "not_joined" => match self.client.send(self.join.clone(), Vec::new()).await? {
                    RelayToClient::Welcome(_) => self.client.agree_keys(&self.session_key).await?,
                    RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                        tracing::info!(%reason, "the relay is busy; joining again later");
                        platform::sleep(retry_delay(tries)).await;
                    }
                    RelayToClient::Rejected { reason, .. } => {
                        return Err(PeerError::Refused(reason));
                    }
                    _ => return Err(PeerError::Unexpected("join")),
                },
                "not_sealed" | "unknown_session" => {
                    self.client.agree_keys(&self.session_key).await?
                }
                busy if busy.ends_with("busy") => {
                    tracing::info!(kind = busy, %reason, "the relay is busy; asking again");
                    platform::sleep(retry_delay(tries)).await;
                }
                _ => return Ok(answer),
            }
        }
    }

    pub(crate) async fn request(&self, message: ClientToRelay) -> Result<RelayToClient, PeerError> {
        self.send_mending(message, Vec::new()).await
    }

    /// Sends an update with its payload ([`Self::send_mending`]).
    pub(crate) async fn submit(
        &self,
        update: Update,
        payload: Vec<u8>,
    ) -> Result<RelayToClient, PeerError> {
        self.send_mending(ClientToRelay::Update(update), payload)
            .await
    }

    /// Sends the `unsent` update, if any, and reports the relay's answer; `unsent` is cleared
    /// once the relay has answered.
    pub(crate) async fn send_update(
        &self,
        unsent: &mut Option<(Update, Vec<u8>)>,
        emit: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let Some((update, payload)) = unsent.clone() else {
            return Ok(());
        };
        let round = update.round;
        let bytes = payload.len() as u64;
        let answer = self.submit(update, payload).await?;
        *unsent = None;
        let relay_rtt_ms = self
            .client
            .relay_info()
            .rtt
            .map(|rtt| rtt.as_secs_f64() * 1e3);
        let (accepted, reason) = match answer {
            RelayToClient::Accepted { .. } => (true, None),
            RelayToClient::Rejected { reason, .. } => (false, Some(reason)),
            _ => return Err(PeerError::Unexpected("update")),
        };
        emit(PeerEvent::Submitted {
            round,
            bytes,
            accepted,
            reason,
            relay_rtt_ms,
        });
        if accepted {
            // Only for the page: a relay that cannot say now says it after the next update.
            match self.fetch_credits().await {
                Ok(credits) => emit(credits),
                Err(e) => tracing::info!(error = %e, "could not read this peer's credit"),
            }
        }
        Ok(())
    }

    /// Reveals the `committed` state if `announcement` names this peer for a replay of the
    /// round it was committed for, and reports the relay's answer. The state is let go either
    /// way once its round's audit is announced.
    pub(crate) async fn answer_audit(
        &self,
        announcement: &RoundAnnouncement,
        committed: &mut Option<(u64, Vec<u8>)>,
        emit: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let Some((round, _)) = committed else {
            return Ok(());
        };
        if announcement.round != *round + 1 {
            return Ok(());
        }
        let Some((round, state)) = committed.take() else {
            return Ok(());
        };
        if !announcement.audit.contains(&self.client.identity().peer()) {
            return Ok(());
        }
        let bytes = state.len() as u64;
        let reveal = ClientToRelay::Reveal(Reveal {
            run_id: self.spec.run_id.clone(),
            round,
            state: PayloadRef::of(&state),
        });
        let (accepted, reason) = match self.send_mending(reveal, state).await? {
            RelayToClient::Revealed { .. } => (true, None),
            RelayToClient::Rejected { reason, .. } => (false, Some(reason)),
            _ => return Err(PeerError::Unexpected("reveal")),
        };
        tracing::info!(
            round,
            bytes,
            accepted,
            "revealed the committed state for a replay"
        );
        emit(PeerEvent::Revealed {
            round,
            bytes,
            accepted,
            reason,
        });
        Ok(())
    }

    /// After the last round a peer was asked for: waits (at most the round's deadline and a
    /// minute) for the next announcement and answers its audit, so that stopping does not cost
    /// the last update its credit. A peer told to stop does not wait.
    pub(crate) async fn answer_last_audit(
        &self,
        committed: &mut Option<(u64, Vec<u8>)>,
        config: &PeerConfig,
        emit: &mut impl FnMut(PeerEvent),
    ) -> Result<(), PeerError> {
        let Some((round, _)) = committed else {
            return Ok(());
        };
        let round = *round;
        // The relay replays language-model rounds only.
        if config.stop.get() || self.spec.model.lm_config().is_none() {
            return Ok(());
        }
        let wait = Duration::from_millis(self.spec.round_deadline_ms) + Duration::from_secs(60);
        let next = async {
            match self.next_round(round).await {
                Ok((announcement, _)) => Some(announcement),
                Err(e) => {
                    tracing::info!(error = %e, "no announcement after the last round");
                    None
                }
            }
        };
        let stopped = config.stop.sleep_unless_set(wait);
        futures::pin_mut!(next, stopped);
        if let futures::future::Either::Left((Some(announcement), _)) =
            futures::future::select(next, stopped).await
        {
            self.answer_audit(&announcement, committed, emit).await?;
        }
        Ok(())
    }

    /// This peer's credit in the run's ledger (`GET /api/runs/{run}/peers/{peer}`).
    pub(crate) async fn fetch_credits(&self) -> Result<PeerEvent, String> {
        #[derive(Deserialize)]
        struct Credit {
            samples: u64,
            accepted_updates: u64,
            first_round: u64,
            last_round: u64,
            verified_samples: u64,
            failed_samples: u64,
        }
        let path = format!(
            "api/runs/{}/peers/{}",
            self.spec.run_id,
            self.client.identity().peer().to_hex()
        );
        let body = platform::http_get(&url(&self.relay_url, &path)).await?;
        let credit: Credit = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        Ok(PeerEvent::Credits {
            run: self.spec.run_id.clone(),
            samples: credit.samples,
            accepted_updates: credit.accepted_updates,
            first_round: credit.first_round,
            last_round: credit.last_round,
            verified_samples: credit.verified_samples,
            failed_samples: credit.failed_samples,
        })
    }

    /// Waits for the first round after `after`: announced by gossip, or, should gossip be slow
    /// or lost, found by a long poll that starts [`POLL_AFTER`] later.
    pub(crate) async fn next_round(
        &self,
        after: u64,
    ) -> Result<(RoundAnnouncement, Announced), PeerError> {
        let gossip = async {
            while let Some(gossiped) = self.client.next_gossip().await {
                let verified = protocol::decode::<Signed<RoundAnnouncement>>(&gossiped.data)
                    .map_err(|e| PeerError::Announcement(e.to_string()))
                    .and_then(|signed| self.verify(&signed));
                match verified {
                    Ok(announcement) if announcement.round > after => {
                        return (announcement, Announced::Gossip(gossiped.forwarded_by));
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring a gossiped announcement"),
                }
            }
            futures::future::pending().await
        };
        let poll = async {
            platform::sleep(POLL_AFTER).await;
            self.poll_round(after).await
        };
        futures::pin_mut!(gossip, poll);
        match futures::future::select(gossip, poll).await {
            futures::future::Either::Left((announced, _)) => Ok(announced),
            futures::future::Either::Right((polled, _)) => Ok((polled?, Announced::Poll)),
        }
    }

    /// Long-polls for the first round after `after`.
    pub(crate) async fn poll_round(&self, after: u64) -> Result<RoundAnnouncement, PeerError> {
        Ok(self.poll_signed(after).await?.1)
    }

    /// [`Self::poll_round`], with the announcement as the relay signed it.
    pub(crate) async fn poll_signed(
        &self,
        after: u64,
    ) -> Result<(Signed<RoundAnnouncement>, RoundAnnouncement), PeerError> {
        loop {
            let ask = ClientToRelay::AwaitRound {
                run_id: self.spec.run_id.clone(),
                after: Some(after),
            };
            match self.request(ask).await? {
                RelayToClient::Round(signed) => {
                    let announcement = self.verify(&signed)?;
                    if announcement.round > after {
                        return Ok((signed, announcement));
                    }
                }
                // Still busy after every try: transient, the peer reconnects and goes on.
                RelayToClient::Rejected { kind, reason } if kind.ends_with("busy") => {
                    return Err(PeerError::Busy(reason));
                }
                RelayToClient::Rejected { reason, .. } => return Err(PeerError::Refused(reason)),
                _ => return Err(PeerError::Unexpected("await round")),
            }
        }
    }

    /// θ_t from the linked browsers and the relay, checked against its hash, and the event that
    /// says where it came from.
    pub(crate) async fn fetch_params(
        &self,
        round: u64,
        hash: ParamsHash,
    ) -> Result<(Vec<f32>, PeerEvent), PeerError> {
        let started = Instant::now();
        let total = 4 * self.spec.model.num_params();
        let (bytes, sources) = self
            .client
            .fetch_params_anywhere(&self.spec.run_id, hash, total)
            .await
            .map_err(|e| PeerError::Download(e.to_string()))?;
        let event = PeerEvent::Params {
            round,
            bytes: bytes.len() as u64,
            relay_bytes: sources.relay_bytes,
            from_peers: sources
                .peers
                .into_iter()
                .map(|(peer, bytes)| ThetaPeer {
                    peer: peer.to_string(),
                    bytes,
                })
                .collect(),
            ms: started.elapsed().as_secs_f64() * 1e3,
            peer_failures: sources.failures,
        };
        let params = protocol::params_from_bytes(&bytes)
            .ok_or_else(|| PeerError::Download("parameters are malformed".into()))?;
        Ok((params, event))
    }

    pub(crate) async fn fetch_shard(&self, round: u64) -> Result<DigitsSet, PeerError> {
        let shard = data::assign_shard(
            &self.spec.run_id,
            round,
            &self.client.identity().peer(),
            self.spec.data.n_shards,
        );
        let path = format!("api/runs/{}/shards/{shard}", self.spec.run_id);
        let bytes = platform::http_get(&url(&self.relay_url, &path))
            .await
            .map_err(PeerError::Download)?;
        DigitsSet::from_bytes(&bytes).map_err(|e| PeerError::Download(e.to_string()))
    }

    /// The round's text windows for this peer's slot: `steps · batch` windows of `window`
    /// bytes, in step order.
    pub(crate) async fn fetch_text(&self, round: u64, window: usize) -> Result<Vec<u8>, PeerError> {
        self.fetch_text_of(round, self.slot, window).await
    }

    /// The round's text windows of data slot `slot` ([`Self::fetch_text`]).
    pub(crate) async fn fetch_text_of(
        &self,
        round: u64,
        slot: u32,
        window: usize,
    ) -> Result<Vec<u8>, PeerError> {
        let path = format!("api/runs/{}/text/{round}/{slot}", self.spec.run_id);
        let bytes = platform::http_get(&url(&self.relay_url, &path))
            .await
            .map_err(PeerError::Download)?;
        let expected =
            self.spec.inner.steps as usize * self.spec.inner.batch_size as usize * window;
        if bytes.len() != expected {
            return Err(PeerError::Download(format!(
                "the round's text is {} bytes, expected {expected}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }
}
