//! Relays that federate: one root relay owns each round of a run; edge relays
//! (`swarmtrain-relay serve --upstream <root URL>`) serve peers of the same run and follow it.
//!
//! An edge joins the root's run as [`Role::Edge`](swarmtrain_shared::protocol::Role::Edge)
//! over the libp2p protocol its own peers speak (the same bootstrap, admission, signed envelopes
//! and sealed payloads: [`swarmtrain_client::edge::EdgeLink`]) and is welcomed with a
//! [`Delegation`](swarmtrain_shared::protocol::Delegation), the root's signed statement that the
//! edge's key speaks for the run; the edge's peers find it in their `Welcome` and check the
//! edge's key exchange against it. Then, for each run, [`follow`]:
//! - long-polls the root for each new round, checks the root's signature, fetches θ from the
//!   root once (by hash, over the link) and hands both to the edge's coordinator
//!   ([`Coordinator::adopt`]), which tells its own peers (gossip and long polls, with the
//!   root's signed announcement unchanged) and serves θ to them;
//! - meanwhile the coordinator checks its peers' envelopes, admission, key exchange and updates
//!   as any relay does, and forwards their joins (the root gives the data slot), updates and
//!   reveals to the root ([`Coordinator::handle_from`]); the root checks each peer's own
//!   signature and counts it once per round, so an edge cannot forge or double an update,
//!   and a peer that moves to another edge and sends its update again is refused as a
//!   duplicate.
//!
//! The edge closes no round and keeps no ledger entry: the root aggregates every update exactly
//! as a lone relay would (the same rule over the same updates in peer order, so θ is bitwise a
//! lone relay's), records them and checks them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use swarmtrain_client::edge::EdgeLink;
use swarmtrain_client::peer::retry_delay;
use swarmtrain_shared::protocol::{
    EdgeReport, MAX_MEMBERS, MEMBER_TTL_MS, Member, MemberRole, REPORT_EVERY_MS, RoundAnnouncement,
};
use swarmtrain_shared::{PeerKey, Signed};
use tokio::sync::watch;

use crate::coordinator::Coordinator;
use crate::p2p::Network;

/// The relays of this relay's federation, as `/api/bootstrap` lists them for clients to choose
/// from (the nearest, least loaded) and to fail over to.
///
/// A root lists itself and the edges that reported within [`MEMBER_TTL_MS`]
/// ([`ClientToRelay::Report`](swarmtrain_shared::protocol::ClientToRelay::Report)); an edge
/// lists what its root answered to its last report, with its own load as it is now. A relay
/// without a URL for clients (no `--public-url`, bound to every interface) is listed nowhere; a
/// lone relay lists nothing.
#[derive(Debug, Default)]
pub struct Federation {
    /// This relay's HTTP base URL for clients.
    own_url: Option<String>,
    edge: bool,
    /// Where this relay's load comes from (none in tests without a libp2p node: load 0).
    network: Option<Arc<Network>>,
    /// A root's edges: each one's last report, by the edge's key, and when it came (Unix ms).
    edges: Mutex<HashMap<PeerKey, (Member, u64)>>,
    /// An edge's copy of its root's list.
    from_root: Mutex<Vec<Member>>,
}

impl Federation {
    /// The federation list of a relay reached at `own_url`, an edge when `edge`, whose load is
    /// `network`'s connections.
    pub fn new(own_url: Option<String>, edge: bool, network: Option<Arc<Network>>) -> Self {
        Self {
            own_url,
            edge,
            network,
            ..Self::default()
        }
    }

    /// This relay's URL for clients, if it has one.
    pub fn own_url(&self) -> Option<&str> {
        self.own_url.as_deref()
    }

    /// This relay's load now: its open libp2p connections.
    pub fn own_load(&self) -> u32 {
        self.network
            .as_ref()
            .map_or(0, |n| u32::try_from(n.connections()).unwrap_or(u32::MAX))
    }

    /// A root records `edge`'s `report` (checked by the caller) at `now_ms` and answers with the
    /// list. Beyond [`MAX_MEMBERS`] edges the one that reported longest ago is dropped.
    pub fn reported(&self, edge: PeerKey, report: &EdgeReport, now_ms: u64) -> Vec<Member> {
        {
            let mut edges = self.edges.lock().unwrap_or_else(|e| e.into_inner());
            edges.retain(|_, (_, at)| now_ms.saturating_sub(*at) < MEMBER_TTL_MS);
            // Another identity at the same URL replaces the older (an edge whose key changed).
            edges.retain(|key, (member, _)| *key == edge || member.url != report.url);
            edges.insert(
                edge,
                (
                    Member {
                        url: report.url.clone(),
                        role: MemberRole::Edge,
                        load: report.load,
                    },
                    now_ms,
                ),
            );
            while edges.len() >= MAX_MEMBERS {
                let Some(oldest) = edges.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k)
                else {
                    break;
                };
                edges.remove(&oldest);
            }
        }
        self.members(now_ms)
    }

    /// An edge takes its root's list ([`MAX_MEMBERS`] at most).
    pub fn heard_from_root(&self, mut members: Vec<Member>) {
        members.truncate(MAX_MEMBERS);
        *self.from_root.lock().unwrap_or_else(|e| e.into_inner()) = members;
    }

    /// The federation's relays at `now_ms`, the root first (empty for a lone relay).
    pub fn members(&self, now_ms: u64) -> Vec<Member> {
        let own = self.own_url.as_ref().map(|url| Member {
            url: url.clone(),
            role: if self.edge {
                MemberRole::Edge
            } else {
                MemberRole::Root
            },
            load: self.own_load(),
        });
        if self.edge {
            let mut members = self
                .from_root
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(own) = own
                && !members.is_empty()
            {
                match members.iter_mut().find(|m| m.url == own.url) {
                    Some(listed) => listed.load = own.load,
                    None => members.push(own),
                }
            }
            return members;
        }
        let edges = self.edges.lock().unwrap_or_else(|e| e.into_inner());
        let mut listed: Vec<Member> = edges
            .values()
            .filter(|(_, at)| now_ms.saturating_sub(*at) < MEMBER_TTL_MS)
            .map(|(member, _)| member.clone())
            .collect();
        if listed.is_empty() {
            return Vec::new();
        }
        listed.sort_by(|a, b| a.url.cmp(&b.url));
        own.into_iter().chain(listed).take(MAX_MEMBERS).collect()
    }

    /// The members a client at `client` may be told: loopback URLs only to a client on
    /// loopback (None: this process).
    pub fn for_client(&self, client: Option<std::net::IpAddr>, now_ms: u64) -> Vec<Member> {
        let local = client.is_none_or(|ip| ip.is_loopback());
        let mut members = self.members(now_ms);
        members.retain(|m| local || !is_loopback_url(&m.url));
        members
    }
}

/// Whether `url`'s host is a loopback address or `localhost` (an unparsable URL counts as one:
/// it is told to nobody outside).
fn is_loopback_url(url: &str) -> bool {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()))
    {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        None => true,
    }
}

/// Reports this edge to its root every [`REPORT_EVERY_MS`] (its URL and load, over the first
/// run's link) and keeps the root's answer, the federation's list, until `shutdown`. An edge
/// without a URL for clients reports nothing.
pub async fn report(
    run: Arc<Coordinator>,
    federation: Arc<Federation>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(url) = federation.own_url().map(str::to_owned) else {
        tracing::warn!(
            "this edge relay has no URL for clients (bound to every interface without \
             --public-url): the federation's bootstrap will not list it"
        );
        return;
    };
    let run_id = run.spec().run_id.clone();
    loop {
        if let Some(link) = run.link_to_root() {
            let report = EdgeReport {
                run_id: run_id.clone(),
                url: url.clone(),
                load: federation.own_load(),
            };
            let answer = tokio::select! {
                _ = stopping(&mut shutdown) => return,
                answer = link.report(report) => answer,
            };
            match answer {
                Ok(members) => federation.heard_from_root(members),
                Err(e) => tracing::warn!(error = %e, "the root did not take this edge's report"),
            }
        }
        // Soon after joining, then every REPORT_EVERY_MS.
        let wait = if run.link_to_root().is_some() {
            Duration::from_millis(REPORT_EVERY_MS)
        } else {
            Duration::from_millis(500)
        };
        if pause(&mut shutdown, wait).await {
            return;
        }
    }
}

/// The longest an edge waits before it asks its root again: a root back from a restart is
/// followed within this.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Joins `run`'s root at `root_url` (retrying until it answers), checks that the root's run is
/// the one this edge was configured with, then follows the root's rounds until `shutdown`. A
/// link that fails twice in a row is replaced: the edge fetches the root's bootstrap again (a
/// restarted root may listen on other ports) and joins it again. A root that specifies the run
/// otherwise, or signs with another key than the root the edge first joined, is an error: the
/// edge stops following it (and serves its peers no newer round).
pub async fn follow(
    run: Arc<Coordinator>,
    root_url: String,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let run_id = run.spec().run_id.clone();
    let mut round: Option<u64> = None;
    let mut root_key: Option<Vec<u8>> = None;
    loop {
        let mut attempt = 0;
        let link = loop {
            attempt += 1;
            let joined = tokio::select! {
                _ = stopping(&mut shutdown) => return Ok(()),
                joined = EdgeLink::join(&root_url, &run_id, run.identity()) => joined,
            };
            match joined {
                Ok(link) => break Arc::new(link),
                Err(e) => {
                    let wait = retry_delay(attempt).min(MAX_WAIT);
                    tracing::warn!(root = %root_url, run = %run_id, error = %e, ?wait, "could not join the root; trying again");
                    if pause(&mut shutdown, wait).await {
                        return Ok(());
                    }
                }
            }
        };
        anyhow::ensure!(
            link.spec() == run.spec(),
            "the root at {root_url} specifies run {run_id:?} otherwise than this edge: start \
             the edge with the root's run options"
        );
        let key = root_key.get_or_insert_with(|| link.root_key().to_vec());
        anyhow::ensure!(
            key.as_slice() == link.root_key(),
            "the relay at {root_url} signs run {run_id:?} with another key than the root this \
             edge followed"
        );
        let welcome = link.welcome_round().clone();
        let first = welcome.verify_with_key(link.root_key())?;
        if round.is_none_or(|r| first.round > r) {
            let Some(taken) = take(&run, &link, welcome, &first, &mut shutdown).await else {
                return Ok(());
            };
            round = Some(taken);
        }
        run.set_link(link.clone());
        tracing::info!(root = %root_url, run = %run_id, ?round, "edge relay following its root");
        let mut failures = 0;
        while failures < 2 {
            let after = round.unwrap_or_default();
            let next = tokio::select! {
                _ = stopping(&mut shutdown) => return Ok(()),
                next = link.await_round(after) => next,
            };
            match next {
                Ok((signed, announcement)) => {
                    failures = 0;
                    let taken = take(&run, &link, signed, &announcement, &mut shutdown).await;
                    let Some(taken) = taken else {
                        return Ok(());
                    };
                    round = Some(taken);
                }
                Err(e) => {
                    failures += 1;
                    let wait = retry_delay(failures).min(MAX_WAIT);
                    tracing::warn!(run = %run_id, error = %e, ?wait, "lost the root's rounds; asking again");
                    if pause(&mut shutdown, wait).await {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Resolves once the relay is shutting down (at once if it already is: a `changed()` seen
/// elsewhere would be missed).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    // An error: the relay dropped its sender without saying so; stop too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Waits `wait`, or less if the relay shuts down meanwhile (then true).
async fn pause(shutdown: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = stopping(shutdown) => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

/// Fetches θ of `announcement` from the root (trying again until it comes) and has the edge's
/// run adopt the round; returns the round the run is in, or `None` if the relay shuts down
/// first.
async fn take(
    run: &Coordinator,
    link: &EdgeLink,
    signed: Signed<RoundAnnouncement>,
    announcement: &RoundAnnouncement,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<u64> {
    let mut attempt = 0;
    loop {
        let fetched = tokio::select! {
            _ = stopping(shutdown) => return None,
            fetched = link.fetch_params(announcement.round, announcement.params) => fetched,
        };
        match fetched {
            Ok(params) => {
                run.adopt(signed, announcement, params).await;
                return Some(announcement.round);
            }
            Err(e) => {
                attempt += 1;
                let wait = retry_delay(attempt).min(MAX_WAIT);
                tracing::warn!(round = announcement.round, error = %e, ?wait, "could not fetch θ from the root; trying again");
                if pause(shutdown, wait).await {
                    return None;
                }
            }
        }
    }
}
