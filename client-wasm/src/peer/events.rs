//! What a peer reports as it works: [`PeerEvent`]s, which the page shows and the npm package
//! hands to its `onEvent` callback (their TypeScript types are generated from these).

use serde::{Deserialize, Serialize};

/// A browser this peer holds a direct WebRTC connection to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct DirectPeer {
    /// Its libp2p peer ID.
    pub peer: String,
    /// The last ping round trip over the direct connection (None before the first).
    pub rtt_ms: Option<f64>,
    /// The ICE candidate pair the link uses (None natively, or when the browser's stats do not
    /// say).
    #[cfg_attr(target_arch = "wasm32", tsify(optional))]
    pub path: Option<crate::webrtc::LinkPath>,
}

/// A linked browser that sent part of a θ.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
pub struct ThetaPeer {
    /// Its libp2p peer ID.
    pub peer: String,
    /// θ bytes it sent.
    pub bytes: u64,
}

/// What a peer reports as it works (the browser page shows these).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(target_arch = "wasm32", derive(tsify_next::Tsify))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PeerEvent {
    Backend {
        backend: String,
        detail: String,
    },
    /// Joined `run` as `peer`, connected to the relay over `transport` ("webrtc-direct", "ws", "tcp").
    Joined {
        /// The relay's HTTP base URL: the one the peer was given, or another relay of its
        /// federation ([`crate::peer::relays`]).
        relay: String,
        run: String,
        peer: String,
        transport: String,
        /// The relay address dialed (from the bootstrap document).
        address: String,
    },
    /// Joined a run of this model (`ModelSpec::describe`).
    Model {
        model: String,
        n_params: usize,
    },
    Round {
        round: u64,
        inner_steps: u32,
        accuracy: Option<f32>,
        /// Held-out loss of the round's θ (language-model runs).
        val_loss: Option<f32>,
        /// How the announcement arrived: "welcome" (the round current at joining), "gossip"
        /// or "poll" (the long poll, when gossip was slow or lost).
        via: String,
        /// The linked browser that forwarded the gossiped announcement over its direct link
        /// (None: the relay sent it itself).
        forwarded_by: Option<String>,
    },
    /// The round's θ (`bytes`) is being fetched, from the `linked` browsers and the relay.
    Fetching {
        round: u64,
        bytes: u64,
        linked: u32,
    },
    /// The round's θ arrived: `bytes` in `ms`, `relay_bytes` of them from the relay and the
    /// rest from the linked browsers `from_peers`, and why linked browsers stopped being asked.
    Params {
        round: u64,
        bytes: u64,
        relay_bytes: u64,
        from_peers: Vec<ThetaPeer>,
        ms: f64,
        peer_failures: Vec<String>,
    },
    /// Text sampled on this peer's backend from the global model of `round`.
    Sample {
        round: u64,
        text: String,
    },
    /// The browsers this peer holds direct WebRTC connections to changed (`error`: why the
    /// last attempt to listen or dial failed, if one did).
    Direct {
        peers: Vec<DirectPeer>,
        error: Option<String>,
    },
    /// How many of the run's `run_steps` inner steps this peer plans for `round`: as many as
    /// fit in `budget_ms` (the time to the round's deadline, less a fifth for sending) at
    /// `step_ms` a step, measured on the rounds before (None: the first round, which plans
    /// them all).
    Plan {
        round: u64,
        planned_steps: u32,
        run_steps: u32,
        step_ms: Option<f64>,
        budget_ms: u64,
    },
    /// Trained `steps` of the round's `planned_steps` (fewer when the round's deadline came
    /// first).
    Trained {
        round: u64,
        steps: u32,
        planned_steps: u32,
        loss: f32,
        train_ms: u64,
        rounds_trained: u64,
    },
    /// The round in training: `steps` of `planned_steps` taken, `elapsed_ms` after the round
    /// was announced, whose deadline is `deadline_ms` after that (about every half second).
    Progress {
        round: u64,
        steps: u32,
        planned_steps: u32,
        elapsed_ms: u64,
        deadline_ms: u64,
    },
    /// What the relay's ledger credits this peer with in `run` (every session of its
    /// identity), after an accepted update: `samples` in all, and of them those the relay's
    /// checks verified and failed (the rest are unchecked; an update is checked after its
    /// round closes, so the newest are not yet).
    Credits {
        run: String,
        samples: u64,
        accepted_updates: u64,
        first_round: u64,
        last_round: u64,
        verified_samples: u64,
        failed_samples: u64,
    },
    /// The relay's answer to the update (`bytes`: its encoded payload); `relay_rtt_ms` is the
    /// last ping round trip to it.
    Submitted {
        round: u64,
        bytes: u64,
        accepted: bool,
        reason: Option<String>,
        relay_rtt_ms: Option<f64>,
    },
    /// The relay drew this peer's update of `round` for a replay and the peer revealed the
    /// state it committed to (`bytes`); `accepted` is whether the relay took the reveal (the
    /// replay's verdict comes later, in the credits).
    Revealed {
        round: u64,
        bytes: u64,
        accepted: bool,
        reason: Option<String>,
    },
    /// The connection to the relay failed (`error`); the peer tries again in `delay_ms`, its
    /// `attempt`-th try in a row. Its identity, AdamW moments and error-feedback residual are
    /// kept.
    Reconnecting {
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    /// The peer stopped (`stop` was set or `max_rounds` reached) after training
    /// `rounds_trained` rounds.
    Stopped {
        rounds_trained: u64,
    },
    Error {
        message: String,
    },
}
