//! Fetching θ: from every linked browser at once by leaves checked against the manifest, the
//! relay helping after [`RELAY_PATIENCE`](super::RELAY_PATIENCE) or when no browser is left to
//! ask (the strategy is in [`super`]; the requests go through [`RelayClient`]).

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use libp2p::PeerId;
use swarmtrain_shared::leaves::{Manifest, leaf_range};
use swarmtrain_shared::protocol::{ParamsHash, WireError};

use super::{Assembly, Source, ThetaAnswer, ThetaRequest, ThetaSources};
use crate::platform;
use crate::rpc::{RelayClient, RpcError};

impl RelayClient {
    /// θ (`total` bytes, by its hash, both from the signed announcement) from every browser
    /// linked to this one at once and, when they cannot finish it, from the relay (see
    /// [`crate::theta`]); then served to linked browsers. Every byte from a peer is checked
    /// against the hash before it is used.
    pub async fn fetch_params_anywhere(
        &self,
        run_id: &str,
        hash: ParamsHash,
        total: usize,
    ) -> Result<(Vec<u8>, ThetaSources), RpcError> {
        let mut peers = self.relay_info().direct_peers;
        let mut sources = ThetaSources::default();
        let bytes = match self
            .manifest_from(&mut peers, hash, total, &mut sources)
            .await
        {
            Some(manifest) => {
                let (bytes, found) = self.fetch_leaves(run_id, hash, manifest, &peers).await?;
                sources.relay_bytes = found.relay_bytes;
                sources.peers = found.peers;
                sources.failures.extend(found.failures);
                bytes
            }
            None => {
                let bytes = self.fetch_params(run_id, hash).await?;
                sources.relay_bytes = bytes.len() as u64;
                bytes
            }
        };
        self.served().keep(hash, &bytes);
        Ok((bytes, sources))
    }

    /// The θ's manifest from the first linked browser that gives a right one, all asked at
    /// once; those that fail are recorded in `sources` and left out of `peers`.
    async fn manifest_from(
        &self,
        peers: &mut Vec<PeerId>,
        hash: ParamsHash,
        total: usize,
        sources: &mut ThetaSources,
    ) -> Option<Manifest> {
        if !super::by_leaves(total) {
            return None;
        }
        let one = |peer: PeerId| async move {
            let mut cvs = Vec::new();
            loop {
                let request = ThetaRequest::Manifest {
                    hash: hash.0,
                    from: cvs.len() as u32,
                };
                let answer = self
                    .ask_peer(peer, &request)
                    .await
                    .map_err(|e| (peer, e.to_string()))?;
                if super::manifest_page(&mut cvs, total, answer).map_err(|e| (peer, e))? {
                    break;
                }
            }
            Manifest::verify(hash, total, cvs).ok_or_else(|| {
                (
                    peer,
                    "sent a manifest that does not match the θ's hash".into(),
                )
            })
        };
        let mut asked: futures::stream::FuturesUnordered<_> =
            peers.iter().map(|&p| one(p)).collect();
        let first = async {
            while let Some(result) = asked.next().await {
                match result {
                    Ok(manifest) => return Some(manifest),
                    Err((peer, e)) => {
                        peers.retain(|p| *p != peer);
                        sources.failures.push(format!("{peer} {e}"));
                    }
                }
            }
            None
        };
        // One deadline for the whole manifest, every page and every peer: past it, the θ
        // comes from the relay.
        let found = {
            let deadline = platform::sleep(super::MANIFEST_DEADLINE);
            futures::pin_mut!(first, deadline);
            match futures::future::select(first, deadline).await {
                futures::future::Either::Left((manifest, _)) => Ok(manifest),
                futures::future::Either::Right(_) => Err(()),
            }
        };
        found.unwrap_or_else(|()| {
            sources.failures.push(format!(
                "no manifest from the linked browsers within {:?}",
                super::MANIFEST_DEADLINE
            ));
            None
        })
    }

    /// The leaves of `manifest` from `peers` ([`super::PIPELINE`] requests in flight each) and
    /// the relay.
    async fn fetch_leaves(
        &self,
        run_id: &str,
        hash: ParamsHash,
        manifest: Manifest,
        peers: &[PeerId],
    ) -> Result<(Vec<u8>, ThetaSources), RpcError> {
        let total = manifest.total();
        let workers = peers.len() * super::PIPELINE;
        let state = Mutex::new(Assembly::new(manifest, workers));
        let lock = || state.lock().expect("θ assembly");
        let started = web_time::Instant::now();
        let peer_worker = |peer: PeerId| {
            let lock = &lock;
            async move {
                loop {
                    // (Not `while let`: its guard would live across the await.)
                    let next = lock().next_for(peer);
                    let Some(index) = next else { break };
                    let request = ThetaRequest::Leaf {
                        hash: hash.0,
                        index: index as u32,
                    };
                    let why = match self.ask_peer(peer, &request).await {
                        Ok(ThetaAnswer::Leaf { index: i, bytes }) if i as usize == index => {
                            if lock().put(index, &bytes, Source::Peer(peer)) {
                                continue;
                            }
                            "sent a leaf that does not match the manifest".to_owned()
                        }
                        Ok(ThetaAnswer::NotHere) => "no longer holds this θ".to_owned(),
                        Ok(_) => "answered another question".to_owned(),
                        Err(e) => e.to_string(),
                    };
                    lock().give_up(peer, index, why);
                }
                lock().done();
            }
        };
        let relay = async {
            loop {
                if lock().complete() {
                    return Ok(());
                }
                let next = lock().next_for_relay(started.elapsed() >= super::RELAY_PATIENCE);
                let Some(run) = next else {
                    platform::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let span = leaf_range(total, run.start).start..leaf_range(total, run.end - 1).end;
                match self.relay_range(run_id, hash, total, span.clone()).await {
                    Ok(bytes) => {
                        let mut state = lock();
                        for index in run {
                            let leaf = leaf_range(total, index);
                            let leaf = &bytes[leaf.start - span.start..leaf.end - span.start];
                            if !state.put(index, leaf, Source::Relay) {
                                return Err(RpcError::Wire(WireError::Malformed(
                                    "the relay sent θ that does not match its hash".into(),
                                )));
                            }
                        }
                    }
                    Err(e) => {
                        lock().release(run);
                        return Err(e);
                    }
                }
            }
        };
        let workers = peers
            .iter()
            .flat_map(|&peer| std::iter::repeat_n(peer, super::PIPELINE))
            .map(peer_worker);
        // Once θ is whole (the relay's loop ends then), workers still waiting on a slow peer are
        // dropped rather than waited for.
        {
            let peers_done = futures::future::join_all(workers);
            futures::pin_mut!(relay, peers_done);
            match futures::future::select(relay, peers_done).await {
                futures::future::Either::Left((relay, _)) => {
                    relay?;
                    lock().give_up_owing();
                }
                futures::future::Either::Right((_, relay)) => relay.await?,
            }
        }
        Ok(state.into_inner().expect("θ assembly").into_bytes())
    }
}
