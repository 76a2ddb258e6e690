//! The federation's shared ledger (`--ledger-url postgres://…`): one PostgreSQL database that
//! every relay of a federation writes its own peers' accepted updates to, and that each of them
//! reads the leaderboard and a peer's credit from. A relay without it keeps its ledger in its
//! data directory (redb, [`crate::store`]) and an edge asks its root.
//!
//! What is written, and by whom:
//! - `swarmtrain_entries`: one row per accepted update, `(run_id, round, peer)` its key: the
//!   peer's signed envelope (its ML-DSA-65 signature covers the update's fields and its payload's
//!   BLAKE3 digest; the payload itself stays with the root), the samples it earns and the relay
//!   that wrote the row. The peer's own relay writes it once the update is accepted: the root for
//!   the peers connected to it, an edge once the root has answered `Accepted` for its peer.
//! - `swarmtrain_verdicts`: the root's signed verdict on each checked update.
//! - `swarmtrain_credits`: one row per (run, peer), what [`Credit`] holds, updated in the same
//!   statement that inserts an entry or a verdict. An entry or verdict already there (an update
//!   counted once, whichever relay writes it again) changes nothing, and entries and verdicts
//!   add up to the same row in either order.
//!
//! Writes leave the relay's request path: the peer hears `Accepted` once the root has made the
//! update durable in its own data directory (what it resumes from), and the row follows through
//! a bounded queue ([`QUEUE`]) that one task writes in batches, one transaction each, retried
//! until the database takes it. So that a row lost with a killed edge or a full queue does not
//! stay lost, a root with a data directory fills in, one round after it closed, any of the
//! round's entries and verdicts that the database lacks ([`SharedLedger::fill_in`]), written
//! under the root's key.
//!
//! The connection takes TLS (rustls, [`tls`]) where the server offers it, or where the
//! connection string demands it (`sslmode=require`); every query binds its values as
//! parameters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use swarmtrain_shared::protocol::RunSpec;
use swarmtrain_shared::verify::{Outcome, Verdict};
use swarmtrain_shared::{PeerKey, Signed};
use tokio::sync::{Mutex, mpsc};
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::{Credit, LedgerEntry};

/// Rows waiting to be written at most (an entry holds its peer's signed envelope, about 5.4 KB:
/// some 90 MB while the database is away); beyond it a row is dropped (counted, logged), and a
/// root with a data directory fills it in a round later.
pub const QUEUE: usize = 16_384;
/// Rows one transaction writes at most.
const BATCH: usize = 512;
/// How long a connection attempt may take, unless the connection string says
/// (`connect_timeout`): a read waits at most this for a database out of reach.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long reads fail at once after an attempt to reach the database failed.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a write that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The tables, created on first use by whichever relay comes first (under an advisory lock, so
/// relays starting together do not race).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS swarmtrain_entries (
    run_id text NOT NULL,
    round bigint NOT NULL,
    peer bytea NOT NULL,
    recorded_by bytea NOT NULL,
    received_ms bigint NOT NULL,
    samples bigint NOT NULL,
    inner_steps bigint NOT NULL,
    signed bytea NOT NULL,
    PRIMARY KEY (run_id, round, peer)
);
CREATE TABLE IF NOT EXISTS swarmtrain_verdicts (
    run_id text NOT NULL,
    round bigint NOT NULL,
    peer bytea NOT NULL,
    outcome text NOT NULL,
    samples bigint NOT NULL,
    signed bytea NOT NULL,
    PRIMARY KEY (run_id, round, peer)
);
CREATE TABLE IF NOT EXISTS swarmtrain_credits (
    run_id text NOT NULL,
    peer bytea NOT NULL,
    accepted_updates bigint NOT NULL,
    samples bigint NOT NULL,
    inner_steps bigint NOT NULL,
    first_round bigint,
    last_round bigint,
    verified_updates bigint NOT NULL,
    verified_samples bigint NOT NULL,
    failed_updates bigint NOT NULL,
    failed_samples bigint NOT NULL,
    PRIMARY KEY (run_id, peer)
);
CREATE INDEX IF NOT EXISTS swarmtrain_credits_rank
    ON swarmtrain_credits (run_id, (samples - failed_samples) DESC, verified_samples DESC, peer);
";

/// An entry, and the credit row it adds to when it is new.
const INSERT_ENTRY: &str = "
WITH new AS (
    INSERT INTO swarmtrain_entries
        (run_id, round, peer, recorded_by, received_ms, samples, inner_steps, signed)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
    ON CONFLICT DO NOTHING
    RETURNING run_id, peer, round, samples, inner_steps
)
INSERT INTO swarmtrain_credits AS c
    (run_id, peer, accepted_updates, samples, inner_steps, first_round, last_round,
     verified_updates, verified_samples, failed_updates, failed_samples)
SELECT run_id, peer, 1, samples, inner_steps, round, round, 0, 0, 0, 0 FROM new
ON CONFLICT (run_id, peer) DO UPDATE SET
    accepted_updates = c.accepted_updates + 1,
    samples = c.samples + EXCLUDED.samples,
    inner_steps = c.inner_steps + EXCLUDED.inner_steps,
    first_round = LEAST(c.first_round, EXCLUDED.first_round),
    last_round = GREATEST(c.last_round, EXCLUDED.last_round)
";

/// A verdict, and the credit row it settles when it is new.
const INSERT_VERDICT: &str = "
WITH new AS (
    INSERT INTO swarmtrain_verdicts (run_id, round, peer, outcome, samples, signed)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT DO NOTHING
    RETURNING run_id, peer
)
INSERT INTO swarmtrain_credits AS c
    (run_id, peer, accepted_updates, samples, inner_steps,
     verified_updates, verified_samples, failed_updates, failed_samples)
SELECT run_id, peer, 0, 0, 0, $7, $8, $9, $10 FROM new
ON CONFLICT (run_id, peer) DO UPDATE SET
    verified_updates = c.verified_updates + EXCLUDED.verified_updates,
    verified_samples = c.verified_samples + EXCLUDED.verified_samples,
    failed_updates = c.failed_updates + EXCLUDED.failed_updates,
    failed_samples = c.failed_samples + EXCLUDED.failed_samples
";

const CREDIT_COLUMNS: &str = "peer, accepted_updates, samples, inner_steps, first_round, \
    last_round, verified_updates, verified_samples, failed_updates, failed_samples";

/// One row for the database.
#[derive(Clone, Debug)]
pub enum Row {
    Entry {
        run_id: String,
        round: u64,
        peer: PeerKey,
        received_ms: u64,
        samples: u64,
        inner_steps: u64,
        /// postcard of the peer's `Signed<Envelope>`.
        signed: Vec<u8>,
    },
    Verdict {
        verdict: Verdict,
        /// postcard of the relay's `Signed<Verdict>`.
        signed: Vec<u8>,
    },
}

/// What the shared ledger did so far (`/metrics`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LedgerStats {
    /// Rows written (an entry or verdict already there counts too: the write took).
    pub written: u64,
    /// Transactions that failed (each retried).
    pub failed_writes: u64,
    /// Rows dropped because the queue was full.
    pub dropped: u64,
    /// Rows a root filled in from its data directory.
    pub filled_in: u64,
    /// Rows waiting in the queue.
    pub queued: u64,
    /// Reads (credits, the leaderboard, verdicts, a root's comparisons) that failed.
    pub failed_reads: u64,
}

/// A relay's handle on the federation's shared ledger.
pub struct SharedLedger {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// The key of this relay: what it writes is recorded under it.
    relay: PeerKey,
    rows: mpsc::Sender<Row>,
    /// The connection reads share (tokio-postgres pipelines the queries of concurrent
    /// requests on it); opened again when it closes.
    reader: Mutex<Reader>,
    written: AtomicU64,
    failed_writes: AtomicU64,
    dropped: AtomicU64,
    filled_in: AtomicU64,
    failed_reads: AtomicU64,
}

impl std::fmt::Debug for SharedLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: only where it points.
        f.debug_struct("SharedLedger")
            .field("hosts", &self.config.get_hosts())
            .field("dbname", &self.config.get_dbname())
            .finish_non_exhaustive()
    }
}

/// How the relay reaches the database: TLS where the connection string asks for it
/// (`sslmode=require`; `prefer`, tokio-postgres's default, takes TLS when the server offers
/// it), the server's certificate checked against the system's roots and `ca` (PEM) for the host
/// the connection string names; plain TCP where the server has no TLS and `sslmode` allows it.
pub fn tls(ca: Option<&std::path::Path>) -> anyhow::Result<MakeRustlsConnect> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "a system root certificate could not be read");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca {
        for cert in CertificateDer::pem_file_iter(ca)
            .with_context(|| format!("reading {}", ca.display()))?
        {
            roots
                .add(cert.with_context(|| format!("{}: not a PEM certificate", ca.display()))?)
                .with_context(|| format!("{}: a certificate rustls refuses", ca.display()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::ring::default_provider().into(),
    )
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// The reading connection, and when opening it last failed: reads fail at once for
/// [`RECONNECT_AFTER`] after a failed attempt rather than each waiting for one of their own.
#[derive(Default)]
struct Reader {
    client: Option<std::sync::Arc<Client>>,
    failed_at: Option<tokio::time::Instant>,
}

/// Opens a connection and drives it on a task of its own.
async fn connect(
    config: &tokio_postgres::Config,
    tls: &MakeRustlsConnect,
) -> anyhow::Result<Client> {
    let (client, connection) = config
        .connect(tls.clone())
        .await
        .context("connecting to the shared ledger")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "the shared ledger's connection ended");
        }
    });
    Ok(client)
}

fn signed_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn unsigned(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

impl SharedLedger {
    /// Connects to `url` (`postgres://user:password@host:port/db` or the key=value form), creates
    /// the tables if they are not there and starts the task that writes rows. Fails when the
    /// database cannot be reached: a relay told to share its ledger does not start without it.
    pub async fn open(
        url: &str,
        tls: MakeRustlsConnect,
        relay: PeerKey,
    ) -> anyhow::Result<std::sync::Arc<Self>> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .context("--ledger-url is not a PostgreSQL connection string")?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let mut client = connect(&config, &tls).await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7374617274)", &[])
            .await?;
        tx.batch_execute(SCHEMA)
            .await
            .context("creating the shared ledger's tables")?;
        tx.commit().await?;
        let (rows, queue) = mpsc::channel(QUEUE);
        let ledger = std::sync::Arc::new(Self {
            config,
            tls,
            relay,
            rows,
            reader: Mutex::new(Reader {
                client: Some(std::sync::Arc::new(client)),
                failed_at: None,
            }),
            written: AtomicU64::new(0),
            failed_writes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            filled_in: AtomicU64::new(0),
            failed_reads: AtomicU64::new(0),
        });
        tokio::spawn(write_rows(std::sync::Arc::downgrade(&ledger), queue));
        Ok(ledger)
    }

    /// Queues `row`, written under this relay's key; a full queue drops it (counted and logged).
    pub fn record(&self, row: Row) {
        if self.rows.try_send(row).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "the shared ledger's queue is full: a row is dropped (a root with a data \
                     directory fills it in a round later)"
                );
            }
        }
    }

    /// Counts.
    pub fn stats(&self) -> LedgerStats {
        LedgerStats {
            written: self.written.load(Ordering::Relaxed),
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            filled_in: self.filled_in.load(Ordering::Relaxed),
            queued: (QUEUE - self.rows.capacity()) as u64,
            failed_reads: self.failed_reads.load(Ordering::Relaxed),
        }
    }

    /// Runs `read` on the reading connection, opening it again if it closed. The lock is held
    /// only to (re)connect: concurrent reads share the connection.
    async fn read<T>(
        &self,
        read: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> anyhow::Result<T> {
        let done = self.try_read(read).await;
        if done.is_err() {
            self.failed_reads.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    async fn try_read<T>(
        &self,
        read: impl AsyncFnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> anyhow::Result<T> {
        let client = {
            let mut reader = self.reader.lock().await;
            match &reader.client {
                Some(client) if !client.is_closed() => client.clone(),
                _ => {
                    if reader
                        .failed_at
                        .is_some_and(|at| at.elapsed() < RECONNECT_AFTER)
                    {
                        anyhow::bail!("the shared ledger was out of reach a moment ago");
                    }
                    match connect(&self.config, &self.tls).await {
                        Ok(client) => {
                            let client = std::sync::Arc::new(client);
                            *reader = Reader {
                                client: Some(client.clone()),
                                failed_at: None,
                            };
                            client
                        }
                        Err(e) => {
                            reader.failed_at = Some(tokio::time::Instant::now());
                            return Err(e);
                        }
                    }
                }
            }
        };
        read(&client).await.context("reading the shared ledger")
    }

    /// `peer`'s credit in `run_id`, if any update of it was recorded or settled.
    pub async fn credit(&self, run_id: &str, peer: &PeerKey) -> anyhow::Result<Option<Credit>> {
        let query = format!(
            "SELECT {CREDIT_COLUMNS} FROM swarmtrain_credits WHERE run_id = $1 AND peer = $2"
        );
        let row = self
            .read(async |c| c.query_opt(&query, &[&run_id, &peer.0.as_slice()]).await)
            .await?;
        row.map(|row| credit_of(&row).map(|(_, credit)| credit))
            .transpose()
    }

    /// The `limit` peers with the most earned samples (verified and unchecked; then the most
    /// verified; then by key), and how many peers have a credit row: what
    /// [`crate::coordinator::Coordinator::leaderboard`] gives from memory.
    pub async fn leaderboard(
        &self,
        run_id: &str,
        limit: usize,
    ) -> anyhow::Result<(Vec<(PeerKey, Credit)>, usize)> {
        let query = format!(
            "SELECT {CREDIT_COLUMNS} FROM swarmtrain_credits WHERE run_id = $1 \
             ORDER BY samples - failed_samples DESC, verified_samples DESC, peer LIMIT $2"
        );
        let limit = signed_i64(limit as u64);
        let (rows, count) = self
            .read(async |c| {
                let rows = c.query(&query, &[&run_id, &limit]).await?;
                let count = c
                    .query_one(
                        "SELECT count(*) FROM swarmtrain_credits WHERE run_id = $1",
                        &[&run_id],
                    )
                    .await?;
                Ok((rows, count.get::<_, i64>(0)))
            })
            .await?;
        let top = rows.iter().map(credit_of).collect::<anyhow::Result<_>>()?;
        Ok((top, unsigned(count) as usize))
    }

    /// `peer`'s verdicts in `run_id` for the rounds `rounds`, newest first (postcard of the
    /// root's `Signed<Verdict>`).
    pub async fn verdicts(
        &self,
        run_id: &str,
        peer: &PeerKey,
        rounds: std::ops::Range<u64>,
    ) -> anyhow::Result<Vec<Vec<u8>>> {
        let (low, high) = (signed_i64(rounds.start), signed_i64(rounds.end));
        let rows = self
            .read(async |c| {
                c.query(
                    "SELECT signed FROM swarmtrain_verdicts WHERE run_id = $1 AND peer = $2 \
                     AND round >= $3 AND round < $4 ORDER BY round DESC",
                    &[&run_id, &peer.0.as_slice(), &low, &high],
                )
                .await
            })
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// How many entries and verdicts of `run_id`'s `round` the database holds.
    pub async fn counts(&self, run_id: &str, round: u64) -> anyhow::Result<(u64, u64)> {
        let round = signed_i64(round);
        self.read(async |c| {
            let row = c
                .query_one(
                    "SELECT (SELECT count(*) FROM swarmtrain_entries WHERE run_id = $1 AND round = $2), \
                            (SELECT count(*) FROM swarmtrain_verdicts WHERE run_id = $1 AND round = $2)",
                    &[&run_id, &round],
                )
                .await?;
            Ok((unsigned(row.get(0)), unsigned(row.get(1))))
        })
        .await
    }

    /// On a root with a data directory: queues `round`'s `entries` and `verdicts` as its data
    /// directory holds them (the kinds of which [`Self::counts`] found the database short),
    /// written under the root's key; a row already there stays as it is. Returns how many rows
    /// it queued.
    pub fn fill_in(
        &self,
        spec: &RunSpec,
        round: u64,
        entries: Vec<(PeerKey, LedgerEntry)>,
        verdicts: Vec<Signed<Verdict>>,
    ) -> anyhow::Result<usize> {
        let mut rows = Vec::with_capacity(entries.len() + verdicts.len());
        for (peer, entry) in entries {
            let update = crate::store::signed_update(&entry)?;
            rows.push(Row::Entry {
                run_id: spec.run_id.clone(),
                round,
                peer,
                received_ms: entry.received_ms,
                samples: spec.samples_of(update.inner_steps),
                inner_steps: u64::from(update.inner_steps),
                signed: postcard::to_allocvec(&entry.signed)?,
            });
        }
        for signed in verdicts {
            rows.push(Row::Verdict {
                verdict: postcard::from_bytes(&signed.body).context("a verdict is corrupt")?,
                signed: postcard::to_allocvec(&signed)?,
            });
        }
        let queued = rows.len();
        if queued > 0 {
            self.filled_in.fetch_add(queued as u64, Ordering::Relaxed);
            tracing::info!(
                run = spec.run_id,
                round,
                rows = queued,
                "the shared ledger lacked some of the round's rows: written again from the data directory"
            );
            for row in rows {
                self.record(row);
            }
        }
        Ok(queued)
    }
}

/// What [`audit`] found of one run in the shared ledger.
#[derive(Debug, Default)]
pub struct RunAudit {
    pub entries: u64,
    pub verdicts: u64,
    /// Peers with a credit row.
    pub peers: u64,
    /// The relays that wrote its entries, and how many each.
    pub recorded_by: BTreeMap<PeerKey, u64>,
    /// The keys that signed its verdicts (a federation's root), and how many each.
    pub verdict_signers: BTreeMap<PeerKey, u64>,
    /// Every row that does not hold up, in words.
    pub problems: Vec<String>,
}

/// Checks everything the shared ledger at `url` holds (or `run`'s only): each entry's signature
/// is its peer's over an update of that run and round; each verdict's signature is good and
/// it names its row; each credit row is what its peer's entries and verdicts add up to. What a
/// relay with write access to the database could change without a peer's key shows here.
pub async fn audit(
    url: &str,
    tls: MakeRustlsConnect,
    run: Option<&str>,
) -> anyhow::Result<BTreeMap<String, RunAudit>> {
    let config: tokio_postgres::Config =
        url.parse().context("not a PostgreSQL connection string")?;
    let client = connect(&config, &tls).await?;
    let runs: Vec<String> = match run {
        Some(run) => vec![run.to_owned()],
        None => client
            .query(
                "SELECT run_id FROM swarmtrain_entries UNION SELECT run_id FROM swarmtrain_credits \
                 ORDER BY 1",
                &[],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect(),
    };
    let mut out = BTreeMap::new();
    for run in runs {
        out.insert(run.clone(), audit_run(&client, &run).await?);
    }
    Ok(out)
}

async fn audit_run(client: &Client, run: &str) -> anyhow::Result<RunAudit> {
    let mut audit = RunAudit::default();
    let mut sums: BTreeMap<PeerKey, Credit> = BTreeMap::new();
    let key = |bytes: &[u8]| <[u8; 32]>::try_from(bytes).ok().map(PeerKey);
    for row in client
        .query(
            "SELECT round, peer, recorded_by, samples, inner_steps, signed \
             FROM swarmtrain_entries WHERE run_id = $1 ORDER BY round, peer",
            &[&run],
        )
        .await?
    {
        audit.entries += 1;
        let round = unsigned(row.get(0));
        let (Some(peer), Some(by)) = (key(row.get(1)), key(row.get(2))) else {
            audit
                .problems
                .push(format!("round {round}: an entry with a malformed key"));
            continue;
        };
        *audit.recorded_by.entry(by).or_default() += 1;
        let (samples, inner_steps) = (unsigned(row.get(3)), unsigned(row.get(4)));
        let what = format!("round {round}, peer {}", peer.to_hex());
        let signed: Result<Signed<swarmtrain_shared::protocol::Envelope>, _> =
            postcard::from_bytes(row.get(5));
        let checked = match signed {
            Err(e) => Err(format!("its signed update does not decode ({e})")),
            Ok(signed) => match signed.verify_and_decode() {
                Err(e) => Err(format!("its signature does not verify ({e})")),
                Ok((signer, _)) if signer != peer => Err(format!(
                    "it is signed by {}, not by its peer",
                    signer.to_hex()
                )),
                Ok((_, envelope)) => match envelope.message {
                    swarmtrain_shared::protocol::ClientToRelay::Update(update)
                        if update.run_id == run
                            && update.round == round
                            && u64::from(update.inner_steps) == inner_steps =>
                    {
                        Ok(())
                    }
                    _ => Err("it is not the peer's update of this run and round".to_owned()),
                },
            },
        };
        if let Err(why) = checked {
            audit.problems.push(format!("entry of {what}: {why}"));
        }
        let credit = sums.entry(peer).or_default();
        if credit.accepted_updates == 0 {
            credit.first_round = round;
        }
        credit.accepted_updates += 1;
        credit.samples += samples;
        credit.inner_steps += inner_steps;
        credit.first_round = credit.first_round.min(round);
        credit.last_round = credit.last_round.max(round);
    }
    for row in client
        .query(
            "SELECT round, peer, outcome, samples, signed FROM swarmtrain_verdicts \
             WHERE run_id = $1 ORDER BY round, peer",
            &[&run],
        )
        .await?
    {
        audit.verdicts += 1;
        let round = unsigned(row.get(0));
        let Some(peer) = key(row.get(1)) else {
            audit
                .problems
                .push(format!("round {round}: a verdict with a malformed key"));
            continue;
        };
        let (outcome, samples): (&str, u64) = (row.get(2), unsigned(row.get(3)));
        let signed: Result<Signed<Verdict>, _> = postcard::from_bytes(row.get(4));
        let checked = match signed {
            Err(e) => Err(format!("it does not decode ({e})")),
            Ok(signed) => match signed.verify_and_decode() {
                Err(e) => Err(format!("its signature does not verify ({e})")),
                Ok((signer, verdict)) => {
                    *audit.verdict_signers.entry(signer).or_default() += 1;
                    if verdict.run_id == run
                        && verdict.round == round
                        && verdict.peer == peer
                        && verdict.outcome.label() == outcome
                        && verdict.samples == samples
                    {
                        Ok(())
                    } else {
                        Err("the signed verdict is not its row's".to_owned())
                    }
                }
            },
        };
        if let Err(why) = checked {
            audit.problems.push(format!(
                "verdict on round {round}, peer {}: {why}",
                peer.to_hex()
            ));
        }
        let credit = sums.entry(peer).or_default();
        match outcome {
            "verified" => {
                credit.verified_updates += 1;
                credit.verified_samples += samples;
            }
            "failed" => {
                credit.failed_updates += 1;
                credit.failed_samples += samples;
            }
            _ => {}
        }
    }
    let query = format!("SELECT {CREDIT_COLUMNS} FROM swarmtrain_credits WHERE run_id = $1");
    for row in client.query(&query, &[&run]).await? {
        audit.peers += 1;
        let (peer, credit) = credit_of(&row)?;
        let mut expected = sums.remove(&peer).unwrap_or_default();
        if expected.accepted_updates == 0 {
            // A credit row made by a verdict alone keeps the verdict's round.
            expected.first_round = credit.first_round;
            expected.last_round = credit.last_round;
        }
        if credit != expected {
            audit.problems.push(format!(
                "credit of peer {}: the row says {credit:?}, its entries and verdicts add up to {expected:?}",
                peer.to_hex()
            ));
        }
    }
    for peer in sums.keys() {
        audit.problems.push(format!(
            "peer {} has entries or verdicts but no credit row",
            peer.to_hex()
        ));
    }
    Ok(audit)
}

/// A credit row as [`CREDIT_COLUMNS`] lists it.
fn credit_of(row: &tokio_postgres::Row) -> anyhow::Result<(PeerKey, Credit)> {
    let peer: &[u8] = row.get(0);
    let peer = PeerKey(
        peer.try_into()
            .context("a shared ledger credit row has a bad peer key")?,
    );
    let at = |i: usize| unsigned(row.get(i));
    let round = |i: usize| row.get::<_, Option<i64>>(i).map(unsigned).unwrap_or(0);
    Ok((
        peer,
        Credit {
            accepted_updates: at(1),
            samples: at(2),
            inner_steps: at(3),
            first_round: round(4),
            last_round: round(5),
            verified_updates: at(6),
            verified_samples: at(7),
            failed_updates: at(8),
            failed_samples: at(9),
        },
    ))
}

/// Writes queued rows in batches until the ledger is dropped; a batch that fails is tried
/// again (on a new connection) after a pause that doubles up to [`MAX_BACKOFF`].
async fn write_rows(ledger: std::sync::Weak<SharedLedger>, mut queue: mpsc::Receiver<Row>) {
    let mut client: Option<Client> = None;
    let mut batch = Vec::with_capacity(BATCH);
    while queue.recv_many(&mut batch, BATCH).await > 0 {
        let mut backoff = Duration::from_millis(100);
        loop {
            let Some(this) = ledger.upgrade() else {
                return;
            };
            let written = async {
                if client.as_ref().is_none_or(Client::is_closed) {
                    client = Some(connect(&this.config, &this.tls).await?);
                }
                write_batch(
                    client.as_mut().expect("connected above"),
                    &this.relay,
                    &batch,
                )
                .await
            }
            .await;
            match written {
                Ok(()) => {
                    this.written
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    this.failed_writes.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error = %e,
                        rows = batch.len(),
                        retry_ms = backoff.as_millis() as u64,
                        "could not write to the shared ledger; trying again"
                    );
                    client = None;
                }
            }
            drop(this);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        batch.clear();
    }
}

/// One transaction for `batch`, written under the key `by`, its statements pipelined (sent without waiting for each
/// answer; the server runs them in order).
async fn write_batch(client: &mut Client, by: &PeerKey, batch: &[Row]) -> anyhow::Result<()> {
    use tokio_postgres::types::ToSql;
    type Param = Box<dyn ToSql + Sync + Send>;
    let tx = client.transaction().await?;
    let entry = tx.prepare(INSERT_ENTRY).await?;
    let verdict = tx.prepare(INSERT_VERDICT).await?;
    let rows: Vec<(&tokio_postgres::Statement, Vec<Param>)> = batch
        .iter()
        .map(|row| match row {
            Row::Entry {
                run_id,
                round,
                peer,
                received_ms,
                samples,
                inner_steps,
                signed,
            } => {
                let params: Vec<Param> = vec![
                    Box::new(run_id.clone()),
                    Box::new(signed_i64(*round)),
                    Box::new(peer.0.to_vec()),
                    Box::new(by.0.to_vec()),
                    Box::new(signed_i64(*received_ms)),
                    Box::new(signed_i64(*samples)),
                    Box::new(signed_i64(*inner_steps)),
                    Box::new(signed.clone()),
                ];
                (&entry, params)
            }
            Row::Verdict { verdict: v, signed } => {
                let samples = signed_i64(v.samples);
                let (verified, failed) = match v.outcome {
                    Outcome::Verified => ((1i64, samples), (0i64, 0i64)),
                    Outcome::Failed { .. } => ((0, 0), (1, samples)),
                    Outcome::Inconclusive { .. } => ((0, 0), (0, 0)),
                };
                let params: Vec<Param> = vec![
                    Box::new(v.run_id.clone()),
                    Box::new(signed_i64(v.round)),
                    Box::new(v.peer.0.to_vec()),
                    Box::new(v.outcome.label()),
                    Box::new(samples),
                    Box::new(signed.clone()),
                    Box::new(verified.0),
                    Box::new(verified.1),
                    Box::new(failed.0),
                    Box::new(failed.1),
                ];
                (&verdict, params)
            }
        })
        .collect();
    let refs: Vec<Vec<&(dyn ToSql + Sync)>> = rows
        .iter()
        .map(|(_, params)| {
            params
                .iter()
                .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                .collect()
        })
        .collect();
    futures::future::try_join_all(
        rows.iter()
            .zip(&refs)
            .map(|((statement, _), params)| tx.execute(*statement, params)),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
