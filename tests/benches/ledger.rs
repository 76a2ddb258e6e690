//! `cargo xtask bench ledger`: the federation's shared ledger (PostgreSQL, `relay/src/ledger.rs`)
//! side by side with a lone relay's own (redb, `relay/src/store.rs`), in one run, on the same
//! signed entries: `PEERS` peers with one accepted update each in each of `ROUNDS` rounds.
//!
//! - Writing: the relay's own path for each. The data directory commits each update in its own
//!   durable transaction before the peer hears `Accepted` (`Store::record_update`); the shared
//!   ledger queues the rows and one task writes them in batches (`SharedLedger::record`), timed
//!   until the database holds them all.
//! - Reading what the API serves: a peer's credit (`/api/runs/{run}/peers/{peer}`) one at a
//!   time and `CONCURRENT` at once (requests on one relay share its connection), and the
//!   leaderboard's top 20. A lone relay serves both from memory, filled from its data directory
//!   at start (`Store::credits`): the reference times that fill and the same sort.
//!
//! PostgreSQL runs on this machine (a server of the bench's own, as the tests start it), over
//! loopback TCP with `fsync` on. Writes the table to `SWARMTRAIN_LEDGER_REPORT`, if set.

use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use swarmtrain_relay::ledger::{Row, SharedLedger};
use swarmtrain_relay::store::{Credit, LedgerEntry, Store};
use swarmtrain_shared::protocol::{ClientToRelay, Codec, Envelope, ParamsHash, PayloadRef, Update};
use swarmtrain_shared::{Identity, PeerKey, Signed};

const PEERS: usize = 10_000;
const ROUNDS: u64 = 2;
const CONCURRENT: usize = 256;
const RUN: &str = "digits";

/// One peer's signed update for `round` (its payload: 100 f32, as small as a test's).
fn entry(identity: &Identity, round: u64) -> (Signed<Envelope>, Vec<u8>) {
    let payload = Codec::F32.encode(&[0.01; 100]);
    let envelope = Envelope {
        peer_id: identity.peer().0.to_vec(),
        seq: round,
        expires_ms: u64::MAX,
        message: ClientToRelay::Update(Update {
            run_id: RUN.into(),
            round,
            base: ParamsHash([0; 32]),
            n_samples: 32,
            inner_steps: 10,
            loss: 1.0,
            codec: Codec::F32,
            payload: PayloadRef::of(&payload),
            state: PayloadRef::of(&[]),
        }),
    };
    (identity.sign(&envelope).expect("sign"), payload)
}

fn quantiles(mut times: Vec<Duration>) -> (f64, f64) {
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// The leaderboard's order (`Coordinator::leaderboard`).
fn top(mut all: Vec<(PeerKey, Credit)>, limit: usize) -> Vec<(PeerKey, Credit)> {
    all.sort_by(|(pa, a), (pb, b)| {
        (b.earned_samples(), b.verified_samples, pa).cmp(&(
            a.earned_samples(),
            a.verified_samples,
            pb,
        ))
    });
    all.truncate(limit);
    all
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(pg) = swarmtrain_tests::Postgres::start_durable() else {
        std::process::exit(1);
    };
    let started = Instant::now();
    let identities: Vec<Identity> = (0..PEERS)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
            Identity::from_seed(seed)
        })
        .collect();
    let entries: Vec<(PeerKey, u64, Signed<Envelope>, Vec<u8>)> = (0..ROUNDS)
        .flat_map(|round| {
            identities.iter().map(move |id| {
                let (signed, payload) = entry(id, round);
                (id.peer(), round, signed, payload)
            })
        })
        .collect();
    let n = entries.len();
    eprintln!(
        "{n} signed entries of {PEERS} peers made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let samples = 320;

    // Writing: the data directory, one durable transaction an update.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let t = Instant::now();
    for (peer, round, signed, payload) in &entries {
        let entry = LedgerEntry {
            received_ms: 0,
            round: *round,
            signed: signed.clone(),
            payload: payload.clone(),
        };
        store
            .record_update(RUN, peer, &entry, samples)
            .expect("record");
    }
    let redb_write = t.elapsed();

    // Writing: the shared ledger, queued and written in batches.
    let tls = swarmtrain_relay::ledger::tls(None).expect("tls");
    let relay = Identity::from_seed([0xee; 32]).peer();
    let ledger = SharedLedger::open(&pg.url, tls, relay)
        .await
        .expect("the shared ledger");
    let t = Instant::now();
    let mut queued = 0;
    for (peer, round, signed, _) in &entries {
        // The queue holds `QUEUE` rows: a relay queues one row an accepted update, far fewer
        // at once than this loop, which waits for room as a full queue would drop.
        while ledger.stats().queued as usize >= swarmtrain_relay::ledger::QUEUE - 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ledger.record(Row::Entry {
            run_id: RUN.into(),
            round: *round,
            peer: *peer,
            received_ms: 0,
            samples,
            inner_steps: 10,
            signed: postcard::to_allocvec(signed).expect("encode"),
        });
        queued += 1;
    }
    while ledger.stats().written < queued {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pg_write = t.elapsed();
    assert_eq!(ledger.stats().dropped, 0);

    // Reading: the reference fills its memory from the data directory and sorts it.
    let t = Instant::now();
    let own = store.credits(RUN).expect("credits");
    let fill = t.elapsed();
    assert_eq!(own.len(), PEERS);
    let mut memory_top = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let board = top(own.clone(), 20);
        memory_top.push(t.elapsed());
        assert_eq!(board.len(), 20);
    }
    let mut pg_top = Vec::new();
    for _ in 0..100 {
        let t = Instant::now();
        let (board, peers) = ledger.leaderboard(RUN, 20).await.expect("leaderboard");
        pg_top.push(t.elapsed());
        assert_eq!((board.len(), peers), (20, PEERS));
    }
    // The same answer from both.
    let (shared, _) = ledger.leaderboard(RUN, 20).await.expect("leaderboard");
    assert_eq!(
        shared,
        top(own.clone(), 20),
        "the shared ledger's top 20 is the relay's"
    );

    let mut one = Vec::new();
    for id in identities.iter().step_by(PEERS / 1000) {
        let t = Instant::now();
        let credit = ledger.credit(RUN, &id.peer()).await.expect("credit");
        one.push(t.elapsed());
        assert_eq!(credit.map(|c| c.accepted_updates), Some(ROUNDS));
    }
    let t = Instant::now();
    let mut answered = 0;
    for chunk in identities.chunks(CONCURRENT).take(1000 / CONCURRENT + 1) {
        let mut reads: FuturesUnordered<_> = chunk
            .iter()
            .map(|id| {
                let (ledger, peer) = (&ledger, id.peer());
                async move { ledger.credit(RUN, &peer).await }
            })
            .collect();
        while let Some(read) = reads.next().await {
            assert!(read.expect("credit").is_some());
            answered += 1;
        }
    }
    let concurrent = t.elapsed();

    let (one_p50, one_p99) = quantiles(one);
    let (top_p50, top_p99) = quantiles(pg_top);
    let (mem_p50, mem_p99) = quantiles(memory_top);
    let report = format!(
        "# The shared ledger against a relay's own\n\n\
         `cargo xtask bench ledger` (tests/benches/ledger.rs): {PEERS} peers, one signed update \
         each in each of {ROUNDS} rounds ({n} entries), written and read by the relay's own code; \
         PostgreSQL on this machine over loopback TCP, a server of the bench's own.\n\n\
         | what | the data directory (redb), a lone relay | the shared ledger (PostgreSQL) |\n\
         | --- | --: | --: |\n\
         | write {n} accepted updates | {:.1} s ({:.0} a second; one durable transaction each, before `Accepted`) | {:.1} s ({:.0} a second; queued, batches of up to 512) |\n\
         | a peer's credit, one at a time, p50 / p99 | from memory | {one_p50:.2} / {one_p99:.2} ms |\n\
         | a peer's credit, {CONCURRENT} at once | from memory | {:.0} a second ({answered} reads in {:.2} s) |\n\
         | the leaderboard's top 20, p50 / p99 | {mem_p50:.2} / {mem_p99:.2} ms (sorting {PEERS} credits in memory) | {top_p50:.2} / {top_p99:.2} ms |\n\
         | at start | {:.0} ms to read {PEERS} credits into memory | nothing to read |\n",
        redb_write.as_secs_f64(),
        n as f64 / redb_write.as_secs_f64(),
        pg_write.as_secs_f64(),
        n as f64 / pg_write.as_secs_f64(),
        answered as f64 / concurrent.as_secs_f64(),
        concurrent.as_secs_f64(),
        fill.as_secs_f64() * 1e3,
    );
    print!("{report}");
    if let Some(path) = std::env::var_os("SWARMTRAIN_LEDGER_REPORT") {
        std::fs::write(path, &report).expect("write the report");
    }
}
