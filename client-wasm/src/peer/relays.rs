//! Which relay of a federation a peer joins, and where it goes when its relay goes away.
//!
//! A federation's relays each list all of them in `/api/bootstrap` (`federation`: URL, role,
//! load). Before each join the peer measures the round trip to every listed relay
//! (`GET /api/ping`, concurrently, [`PROBE_TIMEOUT`] at most) and takes, among those that
//! answered near the fastest ([`near`]), the least loaded, drawn at random among equals so
//! that peers starting together spread out. The relay it was on stays its choice while it
//! answers and is near: a peer does not move for load alone. A relay that does not answer is
//! passed over, which is the fail-over: a peer whose edge went away joins another relay of
//! the federation on its next attempt. A relay that signs the run with another key than the
//! peer's first relay did is not of its federation and is passed over too.
//!
//! A lone relay lists no federation: the peer joins the relay it was given, as before.

use std::time::Duration;

use futures::future::join_all;
use swarmtrain_net::http::url;
use swarmtrain_shared::protocol::Member;
use web_time::Instant;

use super::session::fetch_bootstrap;
use crate::platform;

/// How long a relay may take to answer its round-trip probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Relays the peer probes at most (the list's first, the root first).
pub const MAX_PROBED: usize = 16;

/// A relay and what its probe found.
#[derive(Clone, Debug, PartialEq)]
pub struct Probed {
    pub url: String,
    pub load: u32,
    /// The probe's round trip; `None`: it did not answer.
    pub rtt: Option<Duration>,
}

/// Whether a relay `rtt` away counts as near when the nearest is `best` away: within twice
/// that, plus 25 ms (so that relays on one network or continent are equals and load decides).
pub fn near(rtt: Duration, best: Duration) -> bool {
    rtt <= best * 2 + Duration::from_millis(25)
}

/// The relay to join among `probed`: `current` while it answered and is near; else the least
/// loaded near one (load within an eighth, plus one, of the least counts as equal), the
/// `draw`-th of those equals (mod their number). `None`: none answered.
pub fn choose(probed: &[Probed], current: Option<&str>, draw: usize) -> Option<usize> {
    let best = probed.iter().filter_map(|p| p.rtt).min()?;
    let is_near = |p: &Probed| p.rtt.is_some_and(|rtt| near(rtt, best));
    if let Some(i) = probed
        .iter()
        .position(|p| Some(p.url.as_str()) == current && is_near(p))
    {
        return Some(i);
    }
    let least = probed.iter().filter(|p| is_near(p)).map(|p| p.load).min()?;
    let band = least.saturating_add(1 + least / 8);
    let equals: Vec<usize> = probed
        .iter()
        .enumerate()
        .filter(|(_, p)| is_near(p) && p.load <= band)
        .map(|(i, _)| i)
        .collect();
    Some(equals[draw % equals.len()])
}

/// `GET {relay}api/ping`'s round trip, or `None` when it fails or takes over
/// [`PROBE_TIMEOUT`].
async fn probe(relay: &str) -> Option<Duration> {
    let ping = url(relay, "api/ping");
    let start = Instant::now();
    let get = platform::http_get(&ping);
    let timeout = platform::sleep(PROBE_TIMEOUT);
    futures::pin_mut!(get, timeout);
    match futures::future::select(get, timeout).await {
        futures::future::Either::Left((Ok(_), _)) => Some(start.elapsed()),
        _ => None,
    }
}

/// A random index (for [`choose`]'s draw among equals).
fn draw() -> usize {
    let mut bytes = [0u8; 4];
    match getrandom::fill(&mut bytes) {
        Ok(()) => u32::from_le_bytes(bytes) as usize,
        Err(_) => 0,
    }
}

/// The relays a peer knows of and the one it is on.
#[derive(Debug)]
pub(crate) struct Relays {
    /// The relay the peer was given (its first bootstrap, and the last resort).
    configured: String,
    /// The federation as the last bootstrap listed it.
    known: Vec<Member>,
    /// The relay of the last join.
    current: Option<String>,
    /// The key the run's announcements are signed with, from the first join.
    run_key: Option<Vec<u8>>,
    /// Relays found signing with another key: not of this federation.
    foreign: Vec<String>,
    /// Stay on `configured` ([`PeerConfig::pin_relay`](super::PeerConfig::pin_relay)).
    pinned: bool,
}

impl Relays {
    /// The relays of a peer given `configured`, on which it stays when `pinned`.
    pub(crate) fn new(configured: &str, pinned: bool) -> Self {
        Self {
            pinned,
            configured: configured.to_owned(),
            known: Vec::new(),
            current: None,
            run_key: None,
            foreign: Vec::new(),
        }
    }

    /// The relay to join next (see the module's header). Before the first join it reads the
    /// given relay's bootstrap for the federation's list; without a list, or when no listed
    /// relay answers, it is the given relay.
    pub(crate) async fn pick(&mut self) -> String {
        if self.pinned {
            return self.configured.clone();
        }
        if self.known.is_empty()
            && self.current.is_none()
            && let Ok(bootstrap) = fetch_bootstrap(&self.configured, None).await
        {
            self.known = bootstrap.federation;
        }
        let listed: Vec<&Member> = self
            .known
            .iter()
            .filter(|m| !self.foreign.contains(&m.url))
            .take(MAX_PROBED)
            .collect();
        if listed.len() < 2 {
            return self
                .current
                .clone()
                .unwrap_or_else(|| self.configured.clone());
        }
        let rtts = join_all(listed.iter().map(|m| probe(&m.url))).await;
        let probed: Vec<Probed> = listed
            .iter()
            .zip(rtts)
            .map(|(m, rtt)| Probed {
                url: m.url.clone(),
                load: m.load,
                rtt,
            })
            .collect();
        let chosen = choose(&probed, self.current.as_deref(), draw())
            .map(|i| probed[i].url.clone())
            .unwrap_or_else(|| self.configured.clone());
        tracing::info!(
            relay = %chosen,
            probed = ?probed.iter().map(|p| (&p.url, p.load, p.rtt.map(|d| d.as_millis()))).collect::<Vec<_>>(),
            "chose a relay of the federation"
        );
        chosen
    }

    /// Joined `relay`, whose run is signed with `run_key` and whose bootstrap listed
    /// `federation`. An error (the relay is passed over from now on) when another relay than
    /// the one the peer was given signs with another key than the peer's first relay: that
    /// relay is not of the federation.
    pub(crate) fn joined(
        &mut self,
        relay: &str,
        run_key: &[u8],
        federation: &[Member],
    ) -> Result<(), String> {
        match &self.run_key {
            // The relay the peer was given is trusted with a new key (a relay that lost its
            // state starts its run over).
            Some(_) if relay == self.configured => self.run_key = Some(run_key.to_vec()),
            Some(key) if key.as_slice() != run_key => {
                // As many as a list holds: a federation that keeps listing strangers costs a
                // join attempt each, not memory.
                if self.foreign.len() >= swarmtrain_shared::protocol::MAX_MEMBERS {
                    self.foreign.remove(0);
                }
                self.foreign.push(relay.to_owned());
                return Err(format!(
                    "{relay} signs the run with another key than this peer's first relay: it \
                     is not of the same federation"
                ));
            }
            Some(_) => {}
            None => self.run_key = Some(run_key.to_vec()),
        }
        self.current = Some(relay.to_owned());
        if !federation.is_empty() {
            self.known = federation.to_vec();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(url: &str, load: u32, rtt_ms: Option<u64>) -> Probed {
        Probed {
            url: url.into(),
            load,
            rtt: rtt_ms.map(Duration::from_millis),
        }
    }

    #[test]
    fn the_least_loaded_of_the_near_relays_is_chosen() {
        let probed = [
            relay("root", 900, Some(10)),
            relay("edge-a", 40, Some(12)),
            relay("edge-far", 0, Some(180)),
            relay("edge-b", 400, Some(9)),
        ];
        // The far edge is empty but 180 ms away: not near 9 ms.
        for draw in 0..4 {
            assert_eq!(choose(&probed, None, draw), Some(1));
        }
    }

    #[test]
    fn equally_loaded_relays_are_drawn_among_so_peers_spread() {
        let probed = [
            relay("a", 100, Some(5)),
            relay("b", 110, Some(6)),
            relay("c", 200, Some(5)),
        ];
        // 110 is within an eighth (plus one) of 100: a and b are equals, c is not.
        let picks: Vec<_> = (0..4).map(|d| choose(&probed, None, d)).collect();
        assert_eq!(picks, [Some(0), Some(1), Some(0), Some(1)]);
    }

    #[test]
    fn a_peer_stays_on_its_relay_while_it_answers_and_is_near() {
        let probed = [relay("a", 0, Some(5)), relay("b", 500, Some(8))];
        assert_eq!(choose(&probed, Some("b"), 0), Some(1));
        // Its relay went away: another.
        let probed = [relay("a", 0, Some(5)), relay("b", 500, None)];
        assert_eq!(choose(&probed, Some("b"), 0), Some(0));
        // Nobody answers: no choice (the peer falls back to the relay it was given).
        let probed = [relay("a", 0, None), relay("b", 500, None)];
        assert_eq!(choose(&probed, Some("b"), 0), None);
    }

    #[test]
    fn a_relay_signing_with_another_key_is_passed_over() {
        let mut relays = Relays::new("http://a/", false);
        let listed = vec![];
        relays.joined("http://a/", b"root", &listed).expect("first");
        relays
            .joined("http://b/", b"root", &listed)
            .expect("same key");
        let err = relays
            .joined("http://evil/", b"other", &listed)
            .unwrap_err();
        assert!(err.contains("another key"), "{err}");
        assert_eq!(relays.foreign, ["http://evil/"]);
        assert_eq!(relays.current.as_deref(), Some("http://b/"));
        // The given relay may start over with a new key.
        relays
            .joined("http://a/", b"new", &listed)
            .expect("the given relay");
    }
}
