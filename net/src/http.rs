//! The relay's HTTP API as both sides see it: the `/api/bootstrap` document and how paths
//! join the relay's URL.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use swarmtrain_shared::admission::AdmissionTerms;
use swarmtrain_shared::protocol::Member;

/// The relay's `/api/bootstrap` answer: where to dial it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Bootstrap {
    pub peer_id: String,
    /// The default run.
    pub run_id: String,
    /// Every run on the relay.
    #[serde(default)]
    pub runs: Vec<String>,
    /// Dialable multiaddrs (ending in `/p2p/<peer_id>`), keyed by transport: "tcp", "ws",
    /// "webrtc-direct".
    pub addresses: BTreeMap<String, Vec<String>>,
    /// The relay's clock (Unix ms) when it answered: envelopes expire on this clock.
    #[serde(default)]
    pub time_ms: u64,
    /// Each run's admission terms (a run missing here is open).
    #[serde(default)]
    pub admission: BTreeMap<String, AdmissionTerms>,
    /// The operator's STUN and TURN servers for browser-to-browser links, TURN with
    /// credentials minted for the peer that asked (`?peer=`) and valid for a limited time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<IceServer>,
    /// A federation's relays, the root first, each with its URL and load, for a client to
    /// choose the nearest, least loaded one and to fail over to another (empty: a lone relay).
    /// Loopback URLs are only ever told to clients on loopback.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub federation: Vec<Member>,
}

/// A STUN or TURN server for ICE (`RTCIceServer`, with `urls` always an array). Without any,
/// browsers offer host candidates only, which connect on one network; across NATs a
/// deployment needs STUN, and TURN where STUN cannot punch through (a symmetric NAT).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(target_arch = "wasm32", tsify(optional))]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(target_arch = "wasm32", tsify(optional))]
    pub credential: Option<String>,
}
/// `base` (the relay's URL, with or without a trailing slash) joined with `path`.
pub fn url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

/// `GET url` with reqwest (native nodes; the browser package uses `fetch`): the body, or why
/// there is none (a network error or a status other than 2xx).
#[cfg(not(target_arch = "wasm32"))]
pub async fn get(url: &str) -> Result<Vec<u8>, String> {
    let response = reqwest::get(url)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("GET {url}: HTTP {status}"));
    }
    Ok(response
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .to_vec())
}

#[cfg(test)]
mod tests {
    #[test]
    fn paths_join_the_relay_url_with_one_slash() {
        for base in ["http://127.0.0.1:8080", "http://127.0.0.1:8080/"] {
            for path in ["api/status", "/api/status"] {
                assert_eq!(super::url(base, path), "http://127.0.0.1:8080/api/status");
            }
        }
    }
}
