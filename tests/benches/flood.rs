//! `cargo xtask bench flood`: the honest round time with and without a flood of hostile
//! requests, side by side in one run. A relay (digits run, proof-of-work admission) and three
//! honest native peers train in this process; in the flood phase, hostile connections keep as
//! many requests in flight as the relay allows them, cycling through forged signatures,
//! replays, unadmitted joins, unbound parts, oversized frames and long polls: the attacks of
//! `tests/adversary.rs`, made in advance; and throwaway peer IDs from the same host keep long
//! polls in flight without ever joining. After each phase's rounds a brand-new peer joins and
//! its time to a first accepted update is measured, and the process's peak resident memory is
//! sampled at each round.
//!
//! The attackers run in a second process of this binary at the lowest CPU priority
//! (`nice -n 19`): a real flood comes from other machines, so what the benchmark charges to the
//! honest round is the relay's work on the flood, not the attackers' own signing, dialing and
//! Noise handshakes. They still take every cycle the relay and the honest peers leave idle, and
//! the report gives the request rate they reached.
//!
//! Each phase runs `REPEATS` times, alternating; the report gives the median round time of
//! each, their ratio and the hostile request rate. Writes the table to the path in
//! `SWARMTRAIN_FLOOD_REPORT`, if set.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use swarmtrain_client::peer::PeerEvent;
use swarmtrain_client::rpc::RelayClient;
use swarmtrain_relay::p2p::MAX_IN_FLIGHT_PER_PEER;
use swarmtrain_relay::{Relay, digits_run};
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{
    self, ClientToRelay, Envelope, MAX_FRAME_BYTES, Part, Request, Submission,
};
use swarmtrain_tests::{digits_join, pow_relay_config, rss_kib, spawn_peer};

/// Rounds each honest peer trains per phase; the first (joining, the first download) is not
/// timed.
const ROUNDS: u64 = 20;
/// Times each phase runs, alternating with the other.
const REPEATS: usize = 3;
/// Hostile connections in the flood at a time.
const FLOODERS: u8 = 8;
/// The environment variable that makes this binary the attackers' process, with the relay's
/// address.
const ATTACK: &str = "SWARMTRAIN_FLOOD_ATTACK";
/// Identities each hostile connection has made in advance, to dial again with when the relay
/// closes its connection.
const IDENTITIES: u32 = 200;

async fn start_relay() -> Relay {
    // The digits run as the relay ships it (50 inner steps), with a quorum of the three peers.
    let mut run = digits_run();
    run.quorum = 3;
    let mut config = pow_relay_config(run);
    // The honest peers dial from the attackers' address (loopback): the per-address limit
    // would shut them out with the flood, which on the internet comes from elsewhere.
    config.connections_per_ip = 4096;
    Relay::start(config).await.expect("relay starts")
}

/// What one phase measured.
struct Phase {
    /// The time each round after the first took.
    rounds: Vec<Duration>,
    /// How long a brand-new peer (its proof of work included) took from starting to its first
    /// accepted update, started once the others had trained [`ROUNDS`] rounds.
    newcomer: Duration,
    /// The highest resident memory sampled during the phase, in KiB.
    peak_rss_kib: u64,
}

/// Every phase of one kind (quiet or flooded), in the order they ran.
#[derive(Default)]
struct Phases {
    rounds: Vec<Duration>,
    newcomers: Vec<Duration>,
    peak_rss_kib: Vec<u64>,
}

impl Phases {
    /// Adds `phase`; returns its line for the log.
    fn add(&mut self, phase: Phase) -> String {
        let line = format!(
            "median round {:?}, newcomer {:?}, peak RSS {} MiB",
            median(phase.rounds.clone()),
            phase.newcomer,
            phase.peak_rss_kib / 1024
        );
        self.rounds.extend(phase.rounds);
        self.newcomers.push(phase.newcomer);
        self.peak_rss_kib.push(phase.peak_rss_kib);
        line
    }
}

/// The honest peers train [`ROUNDS`] rounds, then a newcomer joins; returns the time
/// each round after the first took (between the relay opening it and opening the next), every
/// update having been accepted, and the newcomer's time to its first accepted update.
async fn honest_rounds(relay: &Relay) -> Phase {
    let peers: Vec<_> = (1..=3).map(|id| spawn_peer(relay, id, ROUNDS)).collect();
    let mut opened = Vec::new();
    let mut last = relay.coordinator.status().await.round;
    let mut peak_rss_kib = rss_kib();
    while last < ROUNDS {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let round = relay.coordinator.status().await.round;
        if round != last {
            opened.push(Instant::now());
            last = round;
            peak_rss_kib = peak_rss_kib.max(rss_kib());
        }
    }
    // Then a brand-new peer joins (while the others finish) and trains the open round; it is
    // the fourth of a quorum of three, so the round waits for it.
    let started = Instant::now();
    let mut newcomer = spawn_peer(relay, 4, 1);
    let newcomer = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(event) = newcomer.events.recv().await {
            if matches!(event, PeerEvent::Submitted { accepted: true, .. }) {
                let took = started.elapsed();
                newcomer.task.abort();
                return took;
            }
        }
        panic!("the newcomer stopped without an accepted update");
    })
    .await
    .expect("the newcomer's first update is accepted within 2 minutes");
    for peer in peers {
        let (trained, events) = peer.finish().await;
        assert_eq!(trained, ROUNDS);
        let accepted = events
            .iter()
            .filter(|e| matches!(e, PeerEvent::Submitted { accepted: true, .. }))
            .count();
        assert_eq!(accepted as u64, ROUNDS, "every honest update accepted");
    }
    Phase {
        rounds: opened.windows(2).map(|w| w[1] - w[0]).collect(),
        newcomer,
        peak_rss_kib: peak_rss_kib.max(rss_kib()),
    }
}

fn join(proof_of_work: Option<u64>) -> ClientToRelay {
    digits_join("flood", proof_of_work)
}

/// A hostile identity and the frames it cycles through, made before the flood starts (so the
/// attackers' signing does not compete with the relay for this machine's cores): a forged
/// signature, a replayed long poll, a join without the puzzle's solution (then replayed), a part
/// from a connection that has not joined, a truncated frame, an oversized one, and a long poll
/// for a far round.
struct Attacker {
    identity: Identity,
    frames: Vec<Vec<u8>>,
}

/// The libp2p peer ID (as bytes) that `identity`'s seed gives, which its envelopes name.
fn peer_id_of(identity: &Identity) -> Vec<u8> {
    libp2p::identity::Keypair::ed25519_from_bytes(*identity.network_secret())
        .expect("ed25519 key")
        .public()
        .to_peer_id()
        .to_bytes()
}

fn attacker(i: u8, generation: u32) -> Attacker {
    let mut seed = [0; 32];
    seed[0] = 250;
    seed[1] = i;
    seed[2..6].copy_from_slice(&generation.to_le_bytes());
    let identity = Identity::from_seed(seed);
    let peer_id = peer_id_of(&identity);
    let expires_ms = swarmtrain_relay::runs::unix_ms() + protocol::ENVELOPE_VALIDITY_MS;
    let mut seq = 0;
    let mut submission = |message: ClientToRelay| {
        seq += 1;
        let envelope = Envelope {
            peer_id: peer_id.clone(),
            seq,
            expires_ms,
            message,
        };
        Submission {
            signed: identity.sign(&envelope).expect("sign"),
            payload: Vec::new(),
        }
    };
    let poll = |after: Option<u64>| ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after,
    };
    let encode =
        |submission: Submission| protocol::encode(&Request::Submit(submission)).expect("encode");
    let join = submission(join(Some(7)));
    let mut forged = join.clone();
    let last = forged.signed.body.len() - 1;
    forged.signed.body[last] ^= 1;
    let replayed = encode(submission(poll(None)));
    let far = encode(submission(poll(Some(u64::MAX / 2))));
    let frames = vec![
        encode(forged),
        replayed.clone(),
        encode(join),
        protocol::encode(&Request::Part(Part {
            digest: [i; 32],
            total: 60 << 20,
            offset: 0,
            bytes: vec![0; 7 * 1024],
        }))
        .expect("encode"),
        replayed[..replayed.len() / 3].to_vec(),
        vec![7; MAX_FRAME_BYTES + 1],
        replayed,
        far,
    ];
    Attacker { identity, frames }
}

/// Throwaway peer IDs in the second flood, each with its own connection.
const THROWAWAYS: u32 = 400;
/// Throwaway connections dialing at once (the relay takes 512 handshakes at a time).
const DIALING: usize = 50;

/// A throwaway identity and its one frame: a long poll for the open round from an identity
/// that never joined (before round two it parked for 60 s and counted as an active peer; now
/// it is refused as `not_joined` before any signature check, so the same frame serves again).
fn throwaway(i: u32) -> (Identity, Vec<u8>) {
    let mut seed = [0; 32];
    seed[0] = 251;
    seed[1..5].copy_from_slice(&i.to_le_bytes());
    let identity = Identity::from_seed(seed);
    let peer_id = peer_id_of(&identity);
    let envelope = Envelope {
        peer_id,
        seq: 1,
        expires_ms: swarmtrain_relay::runs::unix_ms() + protocol::ENVELOPE_VALIDITY_MS,
        message: ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: Some(0),
        },
    };
    let submission = Submission {
        signed: identity.sign(&envelope).expect("sign"),
        payload: Vec::new(),
    };
    let frame = protocol::encode(&Request::Submit(submission)).expect("encode");
    (identity, frame)
}

/// Keeps [`MAX_IN_FLIGHT_PER_PEER`] polls in flight on `client` until `stop` or until its
/// connection is gone.
async fn poll_flood(client: RelayClient, frame: Vec<u8>, stop: &AtomicBool, tally: &Tally) {
    let mut in_flight = FuturesUnordered::new();
    loop {
        while in_flight.len() < MAX_IN_FLIGHT_PER_PEER && !stop.load(Ordering::Relaxed) {
            let (client, frame) = (client.clone(), frame.clone());
            in_flight.push(async move {
                tokio::time::timeout(Duration::from_secs(2), client.request_frame(frame)).await
            });
            tally.sent.fetch_add(1, Ordering::Relaxed);
        }
        match in_flight.next().await {
            Some(Ok(Ok(_))) => {}
            // Refused or cut: the connection is gone (or a dial was refused at the per-address
            // limit); the identity stops here.
            Some(_) | None => return,
        }
    }
}

/// [`THROWAWAYS`] peer IDs, [`DIALING`] dialing at once, each with the relay's answer to its
/// first poll: the flood in place before the honest peers start.
async fn connect_throwaways(
    address: &libp2p::Multiaddr,
    tally: &Tally,
) -> Vec<(RelayClient, Vec<u8>)> {
    let made: Vec<_> = (0..THROWAWAYS).map(throwaway).collect();
    let mut connected = Vec::new();
    for batch in made.chunks(DIALING) {
        let dialed = batch.iter().map(|(identity, frame)| {
            let client = RelayClient::connect(address.clone(), identity).expect("dial");
            async move {
                let answered = client.request_frame(frame.clone()).await;
                answered.map(|_| (client, frame.clone()))
            }
        });
        connected.extend(
            futures::future::join_all(dialed)
                .await
                .into_iter()
                .flatten(),
        );
    }
    tally
        .throwaways
        .fetch_add(connected.len() as u64, Ordering::Relaxed);
    connected
}

/// What the flooders did.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    /// New identities minted after the relay closed a connection.
    reconnects: AtomicU64,
    /// Throwaway peer IDs whose connection the relay answered.
    throwaways: AtomicU64,
}

/// Keeps [`MAX_IN_FLIGHT_PER_PEER`] requests in flight from hostile connection `i` until
/// `stop`. When the relay closes the connection (its requests fail), the attacker takes the
/// next of its identities and dials again, as a real one would.
async fn flood(
    address: libp2p::Multiaddr,
    attackers: Vec<Attacker>,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) {
    for Attacker { identity, frames } in attackers {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let client = RelayClient::connect(address.clone(), &identity).expect("dial");
        let mut in_flight = FuturesUnordered::new();
        let mut next = frames.iter().cycle();
        let mut closed = false;
        while !closed && !stop.load(Ordering::Relaxed) {
            while in_flight.len() < MAX_IN_FLIGHT_PER_PEER {
                let frame = next.next().expect("cycle").clone();
                let client = client.clone();
                in_flight.push(async move {
                    matches!(
                        tokio::time::timeout(Duration::from_secs(2), client.request_frame(frame))
                            .await,
                        Ok(Err(_))
                    )
                });
                tally.sent.fetch_add(1, Ordering::Relaxed);
            }
            closed = in_flight.next().await.unwrap_or(false);
        }
        tally.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    panic!("a flooder used all its {IDENTITIES} identities: make more");
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// The attackers' side, in its own process (see the module header): makes the armies, says
/// `ready`, floods the relay at `address` until its standard input closes, then prints
/// `sent reconnects` and exits.
async fn attack(address: libp2p::Multiaddr) {
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let armies: Vec<Vec<Attacker>> = (0..FLOODERS)
        .map(|i| (0..IDENTITIES).map(|g| attacker(i, g)).collect())
        .collect();
    let throwaways = connect_throwaways(&address, &tally).await;
    let mut flooders: Vec<_> = armies
        .into_iter()
        .map(|army| tokio::spawn(flood(address.clone(), army, stop.clone(), tally.clone())))
        .collect();
    flooders.extend(throwaways.into_iter().map(|(client, frame)| {
        let (stop, tally) = (stop.clone(), tally.clone());
        tokio::spawn(async move { poll_flood(client, frame, &stop, &tally).await })
    }));
    println!("ready");
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new()))
        .await
        .expect("stdin")
        .expect("read stdin");
    stop.store(true, Ordering::Relaxed);
    for task in flooders {
        task.await.expect("a flooder");
    }
    println!(
        "{} {} {}",
        tally.sent.load(Ordering::Relaxed),
        tally.reconnects.load(Ordering::Relaxed),
        tally.throwaways.load(Ordering::Relaxed)
    );
}

/// Starts the attackers' process at the lowest CPU priority (`nice -n 19`) against `address`
/// and waits until its armies are made.
fn start_attackers(address: &str) -> (Child, BufReader<ChildStdout>) {
    let mut child = Command::new("nice")
        .args(["-n", "19"])
        .arg(std::env::current_exe().expect("this bench's path"))
        .env(ATTACK, address)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the attackers");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("the attackers' ready line");
    assert_eq!(line.trim(), "ready", "the attackers did not start");
    (child, out)
}

/// Stops the attackers' process; returns the requests it sent, the identities it minted and
/// the throwaway peer IDs that got a connection.
fn stop_attackers((mut child, mut out): (Child, BufReader<ChildStdout>)) -> (u64, u64, u64) {
    drop(child.stdin.take());
    let mut line = String::new();
    out.read_line(&mut line).expect("the attackers' tally");
    assert!(
        child.wait().expect("wait").success(),
        "the attackers failed"
    );
    let mut numbers = line.split_whitespace().map(|n| n.parse().expect("a count"));
    (
        numbers.next().expect("sent"),
        numbers.next().expect("reconnects"),
        numbers.next().expect("throwaways"),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Ok(address) = std::env::var(ATTACK) {
        return attack(address.parse().expect("multiaddr")).await;
    }
    let (mut quiet, mut flooded) = (Phases::default(), Phases::default());
    let (mut hostile, mut hostile_secs, mut identities) = (0u64, 0f64, 0u64);
    let mut throwaways = 0u64;
    let mut refusals = std::collections::BTreeMap::new();
    for repeat in 0..REPEATS {
        let relay = start_relay().await;
        let line = quiet.add(honest_rounds(&relay).await);
        println!("quiet   #{repeat}: {line}");
        relay.shutdown().await;

        let relay = start_relay().await;
        let attackers = start_attackers(&relay.bootstrap.addresses["tcp"][0]);
        let started = Instant::now();
        let phase = honest_rounds(&relay).await;
        hostile_secs += started.elapsed().as_secs_f64();
        let (sent, minted, connected) =
            tokio::task::spawn_blocking(move || stop_attackers(attackers))
                .await
                .expect("stop the attackers");
        hostile += sent;
        identities += minted;
        throwaways += connected;
        let line = flooded.add(phase);
        println!(
            "flooded #{repeat}: {line}, {sent} hostile requests, {connected} throwaway peer IDs \
             connected"
        );
        for (kind, n) in relay.coordinator.status().await.rejected {
            *refusals.entry(kind).or_insert(0) += n;
        }
        relay.shutdown().await;
    }
    let (q, f) = (median(quiet.rounds), median(flooded.rounds));
    let ratio = f.as_secs_f64() / q.as_secs_f64();
    let (qn, fn_) = (median(quiet.newcomers), median(flooded.newcomers));
    // Phase by phase, in the order they ran: the allocator keeps what a phase took, so a
    // quiet phase after a flood starts where the flood left the process.
    let mib = |kib: Vec<u64>| {
        kib.iter()
            .map(|k| format!("{}", k / 1024))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (qm, fm) = (mib(quiet.peak_rss_kib), mib(flooded.peak_rss_kib));
    let rate = hostile as f64 / hostile_secs;
    let refused: Vec<String> = refusals.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let report = format!(
        "# Honest rounds under a flood\n\n`cargo xtask bench flood` (`tests/benches/flood.rs`): a \
         relay with proof-of-work admission and three honest native peers training the digits \
         run ({steps} inner steps, quorum 3) in one process, alone and under two floods at once: \
         {FLOODERS} hostile connections keep 8 requests each in flight, and {THROWAWAYS} \
         throwaway peer IDs from the same host (dialing {DIALING} at a time) keep 8 long polls \
         each in flight without ever joining. After the honest rounds of each phase a brand-new \
         peer starts (its proof of work included) and trains the open round. The attackers run in a second process at the \
         lowest CPU priority (`nice -n 19`), as if on other machines: they take the cycles of \
         this machine's {cores} cores that the relay and the honest peers leave idle, and their \
         identities and frames are made before the flood. The relay's per-address connection \
         limit is raised to 4,096 here, since the honest peers share the attackers' loopback \
         address.\n\n\
         | phase | honest round time (median of {n} rounds) | newcomer's first accepted update \
         (median of {REPEATS}) | peak resident memory of the relay and honest peers, \
         MiB, each repeat in turn |\n| --- | --- | --- | --- |\n\
         | quiet | {q:.2?} | {qn:.2?} | {qm} |\n| flooded | {f:.2?} | {fn_:.2?} | {fm} |\n\n\
         Phases alternate, quiet first; memory the allocator took in a phase stays with the \
         process, so a repeat's peak above the first flood's is what would show the flood's \
         memory growing.\n\n\
         Flooded / quiet round time: **{ratio:.2}×** (goal ≤ 2×); newcomer: **{new_ratio:.2}×**. \
         The attackers sent {rate:.0} requests/s ({hostile} in all); the relay closed the \
         hostile connections for their strikes and the attackers minted {identities} new \
         identities to go on; {throwaways} throwaway connections were answered over the \
         phases. Every honest update was accepted. Refusals by reason over the flooded \
         phases: {}.\n",
        refused.join(", "),
        n = (ROUNDS as usize - 1) * REPEATS,
        steps = digits_run().inner.steps,
        cores = std::thread::available_parallelism().map_or(1, usize::from),
        new_ratio = fn_.as_secs_f64() / qn.as_secs_f64(),
    );
    println!("\n{report}");
    if let Some(path) = std::env::var_os("SWARMTRAIN_FLOOD_REPORT") {
        std::fs::write(&path, report).expect("write the report");
    }
}
