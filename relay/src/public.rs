//! The relay on the internet: the addresses it tells peers to dial, which of them a given
//! HTTP client is told, and the STUN/TURN servers it hands browsers, with per-peer,
//! time-limited TURN credentials.
//!
//! **Addresses.** Every address the relay advertises is also given to libp2p as a confirmed
//! external address (`Swarm::add_external_address`), which identify announces and the circuit
//! relay server needs before it serves reservations. Where they come from, in order:
//! - `--external-address` (repeatable): an IP or a host name, combined with each transport's
//!   bound port (a host name is dialed as `/dns/…` over TCP and WebSocket and resolved once at
//!   start for WebRTC-direct, which browsers dial by IP only), or a full multiaddr used as
//!   given (a reverse proxy's `/dns4/relay.example/tcp/443/tls/ws`);
//! - with none given and the relay bound to an unspecified address (`0.0.0.0`, `::`): the
//!   machine's interface addresses of that family (the `if-addrs` crate, which libp2p's
//!   `if-watch` uses too); bound to one address: that address;
//! - loopback interface addresses, told only to clients on loopback.
//!
//! `/api/bootstrap` never tells a client outside loopback a loopback address, and when the
//! request names a host the relay advertises (the `Host` header, or `X-Forwarded-Host` from a
//! `--trusted-proxy`), it answers with that host's addresses only.
//!
//! libp2p's AutoNAT v2 is not used: it lets a node behind a NAT learn whether others can dial
//! it, which needs other servers to probe from; a relay is the server browsers dial, and its
//! operator knows (and says) where it is reachable.
//!
//! **ICE servers.** `--ice-server` URLs (`stun:`, `turn:`, `turns:`) go into the bootstrap
//! document. TURN uses coturn's time-limited shared-secret scheme (`use-auth-secret`, the
//! "TURN REST API" draft): the username is `<expiry unix seconds>:<peer>` and the password
//! base64(HMAC-SHA1(secret, username)), so the secret never leaves the relay and a leaked
//! credential expires by itself.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::Context as _;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use swarmtrain_net::http::IceServer;
use zeroize::Zeroizing;

/// The settings an operator gives for a relay on the internet.
#[derive(Clone, Debug, Default)]
pub struct PublicConfig {
    /// Where the world reaches the relay: IPs, host names or full multiaddrs. Empty: the
    /// interface addresses (or the bound address).
    pub external_addresses: Vec<String>,
    /// Origins whose pages may call the API (`*`: any). Empty: no cross-origin calls.
    pub allow_origins: Vec<String>,
    /// Reverse proxies whose `X-Forwarded-Host` and `X-Forwarded-For` headers are believed.
    pub trusted_proxies: Vec<IpAddr>,
    /// STUN and TURN URLs handed to browsers for browser-to-browser links.
    pub ice_servers: Vec<String>,
    /// coturn's `static-auth-secret`: TURN credentials are minted from it per peer (`Secret`
    /// redacts itself in `Debug`).
    pub turn_secret: Option<Secret>,
    /// How long a minted TURN credential is valid.
    pub turn_ttl_secs: u64,
    /// PEM certificate chain and private key: HTTPS and `wss` instead of HTTP and `ws`.
    pub tls: Option<crate::tls::TlsFiles>,
}

/// A secret that `Debug` does not print and that is zeroed when dropped.
#[derive(Clone, serde::Deserialize)]
#[serde(from = "String")]
pub struct Secret(pub Zeroizing<String>);

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::from(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// One TURN credential's default lifetime: a day (a tab fetches the bootstrap document, and so
/// a fresh credential, on every reconnect).
pub const TURN_TTL_SECS: u64 = 24 * 3600;

/// An operator's `--external-address`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum External {
    Ip(IpAddr),
    Name(String),
    /// Used as given (plus `/p2p/<relay>`, and the certhash for WebRTC-direct).
    Multiaddr(Multiaddr),
}

impl std::str::FromStr for External {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        if s.starts_with('/') {
            let addr: Multiaddr = s
                .parse()
                .with_context(|| format!("{s:?}: not a multiaddr"))?;
            anyhow::ensure!(
                host_of(&addr).is_some() && transport_of(&addr).is_some(),
                "{s:?}: an external multiaddr starts with /ip4, /ip6 or /dns and is TCP, WebSocket or WebRTC-direct"
            );
            return Ok(Self::Multiaddr(addr));
        }
        if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(Self::Ip(ip));
        }
        let name = s.to_ascii_lowercase();
        anyhow::ensure!(
            !name.is_empty()
                && name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }),
            "{s:?} is neither an IP, a host name nor a multiaddr"
        );
        Ok(Self::Name(name))
    }
}

/// The transports the bootstrap document names, in the relay's listener order.
pub const TRANSPORTS: [&str; 3] = ["tcp", "ws", "webrtc-direct"];

fn transport_of(addr: &Multiaddr) -> Option<&'static str> {
    let mut transport = None;
    for p in addr.iter() {
        transport = match p {
            Protocol::Tcp(_) if transport.is_none() => Some("tcp"),
            Protocol::Ws(_) | Protocol::Wss(_) => Some("ws"),
            Protocol::WebRTCDirect => Some("webrtc-direct"),
            _ => transport,
        };
    }
    transport
}

/// The host an address names (an IP or a DNS name), lowercased.
fn host_of(addr: &Multiaddr) -> Option<String> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.to_string()),
        Protocol::Ip6(ip) => Some(ip.to_string()),
        Protocol::Dns(n) | Protocol::Dns4(n) | Protocol::Dns6(n) => Some(n.to_ascii_lowercase()),
        _ => None,
    }
}

fn ip_protocol(ip: IpAddr) -> Protocol<'static> {
    match ip {
        IpAddr::V4(v4) => Protocol::Ip4(v4),
        IpAddr::V6(v6) => Protocol::Ip6(v6),
    }
}

/// `addr` with its first component (the host) replaced by `host`.
fn with_host(addr: &Multiaddr, host: Protocol<'static>) -> Multiaddr {
    std::iter::once(host).chain(addr.iter().skip(1)).collect()
}

/// One advertised address.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// The host a client names to get this address: the IP, the host name (also for the
    /// WebRTC-direct addresses resolved from it), or the multiaddr's host.
    host: String,
    loopback: bool,
    transport: &'static str,
    addr: Multiaddr,
}

/// The relay's advertised addresses, and which of them a client is told.
#[derive(Clone, Debug, Default)]
pub struct Addresses {
    entries: Vec<Entry>,
}

impl Addresses {
    /// The addresses for listeners bound at `bound` (TCP, WebSocket, WebRTC-direct, as
    /// [`TRANSPORTS`]) on `bind_ip`, given the operator's external addresses and, for host
    /// names, their resolved IPs (`resolved`), and the machine's interface IPs (`interfaces`,
    /// used when the relay is bound to an unspecified address and no external one is given).
    pub fn new(
        peer_id: PeerId,
        bind_ip: IpAddr,
        bound: &[Multiaddr],
        external: &[External],
        resolved: &BTreeMap<String, Vec<IpAddr>>,
        interfaces: &[IpAddr],
    ) -> Self {
        let mut entries = Vec::new();
        let mut push = |host: String, loopback: bool, addr: Multiaddr| {
            let Some(transport) = transport_of(&addr) else {
                return;
            };
            let addr = with_peer(addr, peer_id);
            let entry = Entry {
                host,
                loopback,
                transport,
                addr,
            };
            if !entries.contains(&entry) {
                entries.push(entry);
            }
        };
        let bound_of = |transport: &str| {
            bound
                .iter()
                .find(|a| transport_of(a) == Some(transport))
                .cloned()
        };
        let on_ip = |ip: IpAddr, push: &mut dyn FnMut(String, bool, Multiaddr)| {
            for addr in bound {
                push(
                    ip.to_string(),
                    ip.is_loopback(),
                    with_host(addr, ip_protocol(ip)),
                );
            }
        };
        for e in external {
            match e {
                External::Ip(ip) => on_ip(*ip, &mut push),
                External::Name(name) => {
                    for addr in bound {
                        if transport_of(addr) == Some("webrtc-direct") {
                            for ip in resolved.get(name).into_iter().flatten() {
                                push(name.clone(), false, with_host(addr, ip_protocol(*ip)));
                            }
                        } else {
                            push(
                                name.clone(),
                                false,
                                with_host(addr, Protocol::Dns(name.clone().into())),
                            );
                        }
                    }
                }
                External::Multiaddr(addr) => {
                    let mut addr = addr.clone();
                    let webrtc = transport_of(&addr) == Some("webrtc-direct");
                    if webrtc && !addr.iter().any(|p| matches!(p, Protocol::Certhash(_))) {
                        // The certhash is the relay's own: take it from the bound address.
                        if let Some(hash) = bound_of("webrtc-direct").and_then(|b| {
                            b.iter()
                                .find(|p| matches!(p, Protocol::Certhash(_)))
                                .map(|p| p.acquire())
                        }) {
                            addr.push(hash);
                        }
                    }
                    let loopback = matches!(addr.iter().next(), Some(Protocol::Ip4(ip)) if ip.is_loopback())
                        || matches!(addr.iter().next(), Some(Protocol::Ip6(ip)) if ip.is_loopback());
                    push(host_of(&addr).unwrap_or_default(), loopback, addr);
                }
            }
        }
        let same_family = |ip: &IpAddr| bind_ip.is_ipv6() || ip.is_ipv4();
        if bind_ip.is_unspecified() {
            let mut ips: Vec<IpAddr> = interfaces.iter().copied().filter(same_family).collect();
            // Public-looking addresses first, loopback last.
            ips.sort_by_key(|ip| ip.is_loopback());
            for ip in ips {
                if external.is_empty() || ip.is_loopback() {
                    on_ip(ip, &mut push);
                }
            }
        } else if external.is_empty() || bind_ip.is_loopback() {
            on_ip(bind_ip, &mut push);
        }
        Self { entries }
    }

    /// Every advertised address (loopback ones included): what a client on this machine is told.
    pub fn all(&self) -> BTreeMap<String, Vec<String>> {
        self.select(|_| true)
    }

    /// What a client at `client` (None: this process) asking for `host` (the `Host` header's
    /// host, without the port) is told: never a loopback address unless the client is on
    /// loopback, and only `host`'s addresses when the relay advertises that host.
    pub fn for_client(
        &self,
        host: Option<&str>,
        client: Option<IpAddr>,
    ) -> BTreeMap<String, Vec<String>> {
        let local = client.is_none_or(|ip| ip.is_loopback());
        let visible = |e: &Entry| local || !e.loopback;
        let host = host.map(str::to_ascii_lowercase);
        let named = |e: &Entry| host.as_deref() == Some(e.host.as_str());
        if self.entries.iter().any(|e| visible(e) && named(e)) {
            self.select(|e| visible(e) && named(e))
        } else {
            self.select(visible)
        }
    }

    fn select(&self, keep: impl Fn(&Entry) -> bool) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for e in self.entries.iter().filter(|e| keep(e)) {
            out.entry(e.transport.into())
                .or_default()
                .push(e.addr.to_string());
        }
        out
    }

    /// The addresses libp2p is told are the relay's external ones (without `/p2p`).
    pub fn external(&self) -> Vec<Multiaddr> {
        self.entries
            .iter()
            .map(|e| {
                let mut a = e.addr.clone();
                if matches!(a.iter().last(), Some(Protocol::P2p(_))) {
                    a.pop();
                }
                a
            })
            .collect()
    }

    /// The advertised addresses, one a line (`/metrics` and the operator view).
    pub fn describe(&self) -> Vec<(String, String, bool)> {
        self.entries
            .iter()
            .map(|e| (e.transport.to_owned(), e.addr.to_string(), e.loopback))
            .collect()
    }
}

fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => addr,
        _ => addr.with(Protocol::P2p(peer)),
    }
}

/// The host part of a `Host` header value (`relay.example:8443`, `[::1]:80`, `203.0.113.7`).
pub fn host_without_port(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((h, _)) if !h.contains(':') => h,
        _ => host,
    }
}

/// The machine's interface IPs (for a relay bound to an unspecified address).
pub fn interface_ips() -> Vec<IpAddr> {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces
            .into_iter()
            .map(|i| i.ip())
            // Link-local IPv6 needs a zone index that a multiaddr cannot carry.
            .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "could not list the network interfaces");
            Vec::new()
        }
    }
}

/// Resolves the host names among `external` (for WebRTC-direct, which browsers dial by IP).
pub async fn resolve(external: &[External]) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out = BTreeMap::new();
    for e in external {
        if let External::Name(name) = e {
            match tokio::net::lookup_host((name.as_str(), 0)).await {
                Ok(addrs) => {
                    let mut ips: Vec<IpAddr> = addrs.map(|a| a.ip()).collect();
                    ips.dedup();
                    out.insert(name.clone(), ips);
                }
                Err(e) => tracing::warn!(
                    %name, error = %e,
                    "could not resolve the external host name: no WebRTC-direct address for it"
                ),
            }
        }
    }
    out
}

/// The STUN/TURN servers handed to browsers, with TURN credentials minted per peer.
#[derive(Clone, Default)]
pub struct Ice {
    stun: Vec<String>,
    turn: Vec<String>,
    secret: Option<Secret>,
    ttl_secs: u64,
}

impl std::fmt::Debug for Ice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ice")
            .field("stun", &self.stun)
            .field("turn", &self.turn)
            .field("has_secret", &self.secret.is_some())
            .field("ttl_secs", &self.ttl_secs)
            .finish()
    }
}

impl Ice {
    /// Checks the URLs: `stun:`/`stuns:` or `turn:`/`turns:`; TURN needs the shared secret.
    pub fn new(urls: &[String], secret: Option<Secret>, ttl_secs: u64) -> anyhow::Result<Self> {
        let mut ice = Self {
            secret,
            ttl_secs: ttl_secs.max(60),
            ..Self::default()
        };
        for url in urls {
            let scheme = url.split(':').next().unwrap_or("").to_ascii_lowercase();
            match scheme.as_str() {
                "stun" | "stuns" => ice.stun.push(url.clone()),
                "turn" | "turns" => ice.turn.push(url.clone()),
                _ => anyhow::bail!(
                    "ICE server {url:?}: expected a stun:, stuns:, turn: or turns: URL"
                ),
            }
        }
        anyhow::ensure!(
            ice.turn.is_empty() || ice.secret.is_some(),
            "TURN servers need --turn-secret (coturn's static-auth-secret) to mint credentials"
        );
        Ok(ice)
    }

    /// The servers for `peer` (a tag in the TURN username; anything but letters and digits is
    /// dropped), valid until `now_s` + the lifetime.
    pub fn for_peer(&self, peer: &str, now_s: u64) -> Vec<IceServer> {
        let mut servers = Vec::new();
        if !self.stun.is_empty() {
            servers.push(IceServer {
                urls: self.stun.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn.is_empty(), &self.secret) {
            let tag: String = peer
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(64)
                .collect();
            let tag = if tag.is_empty() { "peer".into() } else { tag };
            let username = format!("{}:{tag}", now_s + self.ttl_secs);
            servers.push(IceServer {
                urls: self.turn.clone(),
                credential: Some(turn_password(secret.0.as_bytes(), &username)),
                username: Some(username),
            });
        }
        servers
    }
}

/// coturn's REST-API password: base64(HMAC-SHA1(secret, username)).
pub fn turn_password(secret: &[u8], username: &str) -> String {
    let mut mac = <Hmac<sha1::Sha1>>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> Vec<Multiaddr> {
        [
            "/ip4/0.0.0.0/tcp/4001",
            "/ip4/0.0.0.0/tcp/4002/ws",
            "/ip4/0.0.0.0/udp/4003/webrtc-direct/certhash/uEiDDq4_xNyDorZBH3TlGazyJdOWSwvo4PUo5YHFMrvDE8g",
        ]
        .iter()
        .map(|s| s.parse().expect("multiaddr"))
        .collect()
    }

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn unspecified_bind_advertises_interfaces_and_hides_loopback_from_the_world() {
        let interfaces: Vec<IpAddr> = vec![
            "127.0.0.1".parse().expect("ip"),
            "203.0.113.10".parse().expect("ip"),
            "::1".parse().expect("ip"),
        ];
        let a = Addresses::new(
            peer(),
            "0.0.0.0".parse().expect("ip"),
            &bound(),
            &[],
            &BTreeMap::new(),
            &interfaces,
        );
        let remote = a.for_client(
            Some("203.0.113.10"),
            Some("198.51.100.7".parse().expect("ip")),
        );
        for t in TRANSPORTS {
            assert_eq!(remote[t].len(), 1, "{t}: {remote:?}");
            assert!(remote[t][0].starts_with("/ip4/203.0.113.10/"), "{remote:?}");
        }
        assert!(remote["webrtc-direct"][0].contains("/certhash/"));
        // A remote client naming some other host still never hears of loopback.
        let other = a.for_client(
            Some("relay.example"),
            Some("198.51.100.7".parse().expect("ip")),
        );
        assert!(
            other.values().flatten().all(|a| !a.contains("127.0.0.1")),
            "{other:?}"
        );
        // A local client naming 127.0.0.1 gets loopback only; IPv6 is not bound.
        let local = a.for_client(Some("127.0.0.1"), Some("127.0.0.1".parse().expect("ip")));
        assert!(
            local
                .values()
                .flatten()
                .all(|a| a.starts_with("/ip4/127.0.0.1/")),
            "{local:?}"
        );
        assert!(a.all().values().flatten().all(|a| !a.contains("::1")));
    }

    #[test]
    fn external_addresses_replace_interfaces_and_host_names_resolve_for_webrtc() {
        let external: Vec<External> = [
            "203.0.113.10",
            "Relay.Example",
            "/dns4/relay.example/tcp/443/tls/ws",
        ]
        .iter()
        .map(|s| s.parse().expect("external"))
        .collect();
        assert_eq!(external[1], External::Name("relay.example".into()));
        let mut resolved = BTreeMap::new();
        resolved.insert(
            "relay.example".to_owned(),
            vec!["203.0.113.11".parse().expect("ip")],
        );
        let interfaces: Vec<IpAddr> = vec![
            "127.0.0.1".parse().expect("ip"),
            "10.1.2.3".parse().expect("ip"),
        ];
        let a = Addresses::new(
            peer(),
            "0.0.0.0".parse().expect("ip"),
            &bound(),
            &external,
            &resolved,
            &interfaces,
        );
        let all = a.all();
        assert!(
            all.values().flatten().all(|a| !a.contains("10.1.2.3")),
            "{all:?}"
        );
        let by_name = a.for_client(
            Some("relay.example"),
            Some("198.51.100.7".parse().expect("ip")),
        );
        assert_eq!(
            by_name["ws"],
            [
                format!(
                    "/dns/relay.example/tcp/4002/ws/p2p/{}",
                    peer_of(&by_name["ws"][0])
                ),
                format!(
                    "/dns4/relay.example/tcp/443/tls/ws/p2p/{}",
                    peer_of(&by_name["ws"][0])
                ),
            ]
        );
        assert!(
            by_name["webrtc-direct"][0]
                .starts_with("/ip4/203.0.113.11/udp/4003/webrtc-direct/certhash/")
        );
        assert!(by_name["tcp"][0].starts_with("/dns/relay.example/tcp/4001/"));
        let by_ip = a.for_client(
            Some("203.0.113.10"),
            Some("198.51.100.7".parse().expect("ip")),
        );
        assert!(
            by_ip
                .values()
                .flatten()
                .all(|a| a.starts_with("/ip4/203.0.113.10/")),
            "{by_ip:?}"
        );
        assert!("/ip4/1.2.3.4/udp/1".parse::<External>().is_err());
        assert!("not a host!".parse::<External>().is_err());
    }

    fn peer_of(addr: &str) -> &str {
        addr.rsplit('/').next().expect("peer")
    }

    #[test]
    fn host_headers_lose_their_port() {
        assert_eq!(host_without_port("relay.example:8443"), "relay.example");
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("203.0.113.7"), "203.0.113.7");
        assert_eq!(host_without_port("::1"), "::1");
    }

    #[test]
    fn turn_credentials_follow_coturns_rest_scheme() {
        // RFC 2202's HMAC-SHA1 test case 2 ("Jefe"), base64-encoded.
        assert_eq!(
            turn_password(b"Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
        let ice = Ice::new(
            &[
                "stun:203.0.113.10:3478".into(),
                "turn:203.0.113.10:3478?transport=udp".into(),
            ],
            Some(Secret(Zeroizing::new("s3cret".into()))),
            600,
        )
        .expect("ice");
        let servers = ice.for_peer("12D3Koo/W!x", 1_000);
        assert_eq!(servers[0].urls, ["stun:203.0.113.10:3478"]);
        assert_eq!(servers[0].username, None);
        assert_eq!(servers[1].username.as_deref(), Some("1600:12D3KooWx"));
        assert_eq!(
            servers[1].credential.as_deref(),
            Some(turn_password(b"s3cret", "1600:12D3KooWx").as_str())
        );
        assert!(Ice::new(&["turn:x:3478".into()], None, 600).is_err());
        assert!(Ice::new(&["http://x".into()], None, 600).is_err());
    }
}
