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

use std::sync::Arc;
use std::time::Duration;

use swarmtrain_client::edge::EdgeLink;
use swarmtrain_client::peer::retry_delay;
use swarmtrain_shared::Signed;
use swarmtrain_shared::protocol::RoundAnnouncement;
use tokio::sync::watch;

use crate::coordinator::Coordinator;

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
