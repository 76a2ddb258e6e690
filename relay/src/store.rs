//! Durable run state: checkpoints as safetensors behind `object_store` (a local directory by
//! default), and the run record and contribution ledger in an embedded database (redb) in the
//! data directory.
//!
//! Order of writes, so that a relay killed at any instant resumes without loss:
//! 1. an accepted update is committed to the ledger before the peer hears `Accepted`;
//! 2. when a round closes, θ_{t+1} and the outer momentum are written as a checkpoint, then the
//!    run record is switched to round t+1 in one transaction, and only then is round t+1
//!    announced. The closed round's updates stay in the ledger as history: in full while the
//!    round's checkpoint is kept (the newest `keep` rounds), then as entries without payload
//!    (who sent what for which round, when, with how many samples and what loss), so that the
//!    database does not grow by every update's bytes forever.
//!
//! On start, the record names the last announced round and its checkpoint; the ledger's updates
//! for that round are submitted again, through the same checks as live ones.
//!
//! A write that fails (a full or failing disk) is an error to its caller: the update is refused,
//! the round is not announced. The database is then opened again for the next write ([`Db`]),
//! so the relay recovers when the disk does.
//!
//! The round history is one row per round in its own table, written in the transaction that
//! switches the run record: a round's close costs the same at round 10 as at round 100,000
//! (the record used to carry the whole history and was rewritten every round: 6.7 KB of file
//! growth a round at 28,800 rounds). A [`Retention`] policy deletes history rows and ledger
//! entries older than the operator's horizon in the same transaction.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use swarmtrain_shared::checkpoint::{self, TensorInfo};
use swarmtrain_shared::protocol::{ClientToRelay, Envelope, Update};
use swarmtrain_shared::verify::{Outcome, Verdict};
use swarmtrain_shared::{PeerKey, Signed};

/// run id → postcard [`RunRecord`].
const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
/// (run id, round, peer key) → postcard [`LedgerEntry`]: every accepted update, kept for the
/// ledger; the open round's are replayed on restart.
const LEDGER: TableDefinition<(&str, u64, &[u8]), &[u8]> = TableDefinition::new("ledger");
/// (run id, peer key) → postcard [`Credit`]: what each peer's accepted updates to the run add
/// up to, written with each ledger entry and kept when retention deletes the entries.
const CREDITS: TableDefinition<(&str, &[u8]), &[u8]> = TableDefinition::new("credits");
/// (run id, round, peer key) → postcard `Signed<Verdict>`: what the relay's checks concluded
/// of each accepted update, signed by the relay ([`swarmtrain_shared::verify::Verdict`]).
const VERDICTS: TableDefinition<(&str, u64, &[u8]), &[u8]> = TableDefinition::new("verdicts");
/// run id → the first round whose ledger entries still hold their payloads.
const COMPACTED: TableDefinition<&str, u64> = TableDefinition::new("ledger_compacted");
/// (run id, round) → postcard [`RoundRecord`]: one row per round.
const HISTORY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");

/// How long the store keeps what grows with every round. `None` keeps it for good.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Retention {
    /// Rounds of history rows kept (the newest).
    pub history_rounds: Option<u64>,
    /// Rounds of ledger entries kept (the newest); never fewer than the checkpoints kept, whose
    /// rounds' entries keep their payloads.
    pub ledger_rounds: Option<u64>,
}

/// One row of the run's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Held-out accuracy of the round's θ (classifier runs).
    pub accuracy: Option<f32>,
    /// Held-out loss of the round's θ in nats per byte (language-model runs).
    pub val_loss: Option<f32>,
    pub contributors: usize,
    pub samples: u64,
    pub mean_loss: Option<f32>,
    pub closed_at_ms: u64,
    /// Time the aggregation backend took for the mean and the outer step.
    pub aggregation_ms: f64,
}

/// What a run's record says: enough to resume at the last announced round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The open (last announced) round.
    pub round: u64,
    /// Its checkpoint's key in the object store.
    pub checkpoint: String,
    pub accuracy: Option<f32>,
    /// Held-out loss of the round's θ (language-model runs).
    pub loss: Option<f32>,
    pub accepted: u64,
    pub rejected: BTreeMap<String, u64>,
}

/// One accepted update in the ledger: the peer's signed envelope as it arrived, so anyone
/// holding the ledger can check who sent which update ([`LedgerEntry::verify`]), and the
/// payload, which its signed digest names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub received_ms: u64,
    /// The update's round (also inside the signed envelope).
    pub round: u64,
    /// The envelope the peer signed: its ML-DSA-65 signature covers the update's fields and
    /// its payload's BLAKE3 digest.
    pub signed: Signed<Envelope>,
    /// The encoded Δ; emptied once its round is older than the checkpoints kept.
    pub payload: Vec<u8>,
}

impl LedgerEntry {
    /// Checks the signature and returns the signer and the update it signed; a payload still
    /// kept must match the signed digest.
    pub fn verify(&self) -> anyhow::Result<(PeerKey, Update)> {
        let (peer, envelope) = self
            .signed
            .verify_and_decode()
            .context("a ledger entry's signature does not verify")?;
        let ClientToRelay::Update(update) = envelope.message else {
            anyhow::bail!("a ledger entry holds a message that is not an update");
        };
        anyhow::ensure!(
            update.round == self.round,
            "a ledger entry's round is not the signed one"
        );
        anyhow::ensure!(
            self.payload.is_empty() || update.payload.matches(&self.payload),
            "a ledger entry's payload does not match its signed digest"
        );
        Ok((peer, update))
    }
}

/// What one peer's accepted updates to a run add up to: its credit. Each accepted update is in
/// the ledger as the envelope the peer signed ([`LedgerEntry::verify`]), until retention
/// deletes it; the credit stays. Samples are the run's (`steps × batch` of each update,
/// [`swarmtrain_shared::protocol::RunSpec::samples_of`]); the relay's checks settle each
/// update's samples as verified or failed ([`swarmtrain_shared::verify`]), and the rest are
/// unchecked. A peer earns its verified and unchecked samples; failed ones earn nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credit {
    /// Updates the relay accepted into a round.
    pub accepted_updates: u64,
    /// Samples of those updates.
    pub samples: u64,
    /// Inner steps those updates report.
    pub inner_steps: u64,
    pub first_round: u64,
    pub last_round: u64,
    /// Updates, and their samples, that a check verified.
    pub verified_updates: u64,
    pub verified_samples: u64,
    /// Updates, and their samples, that a check found false.
    pub failed_updates: u64,
    pub failed_samples: u64,
}

/// A credit row as relays before the checks wrote it.
#[derive(Deserialize)]
struct CreditV1 {
    accepted_updates: u64,
    samples: u64,
    inner_steps: u64,
    first_round: u64,
    last_round: u64,
}

impl Credit {
    /// Counts `update` of `samples` samples, accepted into its round (unchecked).
    pub fn add(&mut self, update: &Update, samples: u64) {
        if self.accepted_updates == 0 {
            self.first_round = update.round;
        }
        self.accepted_updates += 1;
        self.samples += samples;
        self.inner_steps += u64::from(update.inner_steps);
        self.first_round = self.first_round.min(update.round);
        self.last_round = self.last_round.max(update.round);
    }

    /// Settles an update's `samples` as `outcome` says (an inconclusive check leaves them
    /// unchecked).
    pub fn settle(&mut self, outcome: &Outcome, samples: u64) {
        match outcome {
            Outcome::Verified => {
                self.verified_updates += 1;
                self.verified_samples += samples;
            }
            Outcome::Failed { .. } => {
                self.failed_updates += 1;
                self.failed_samples += samples;
            }
            Outcome::Inconclusive { .. } => {}
        }
    }

    /// Samples no check has settled.
    pub fn unchecked_samples(&self) -> u64 {
        self.samples
            .saturating_sub(self.verified_samples + self.failed_samples)
    }

    /// Samples that earn credit: verified and unchecked.
    pub fn earned_samples(&self) -> u64 {
        self.samples.saturating_sub(self.failed_samples)
    }

    /// Decodes a credit row, also one written before the checks (all of it unchecked).
    fn decode(bytes: &[u8]) -> anyhow::Result<Self> {
        if let Ok(credit) = postcard::from_bytes::<Self>(bytes) {
            return Ok(credit);
        }
        let old: CreditV1 = postcard::from_bytes(bytes).context("a credit row is corrupt")?;
        Ok(Self {
            accepted_updates: old.accepted_updates,
            samples: old.samples,
            inner_steps: old.inner_steps,
            first_round: old.first_round,
            last_round: old.last_round,
            ..Self::default()
        })
    }
}

/// The update inside a ledger entry's envelope (its signature was checked when it arrived).
pub(crate) fn signed_update(entry: &LedgerEntry) -> anyhow::Result<Update> {
    let envelope: Envelope =
        postcard::from_bytes(&entry.signed.body).context("a ledger entry's envelope")?;
    match envelope.message {
        ClientToRelay::Update(update) => Ok(update),
        _ => anyhow::bail!("a ledger entry holds a message that is not an update"),
    }
}

/// Fills the credits table from the ledger: a data directory written before credits existed.
fn backfill_credits(db: &Db) -> anyhow::Result<()> {
    let mut credits: BTreeMap<(String, [u8; 32]), Credit> = BTreeMap::new();
    {
        let tx = db.begin_read()?;
        for item in tx.open_table(LEDGER)?.iter()? {
            let (key, value) = item?;
            let (run, _, peer) = key.value();
            let Ok(peer) = <[u8; 32]>::try_from(peer) else {
                continue;
            };
            let entry: LedgerEntry = postcard::from_bytes(value.value())?;
            // Written before the run's own sample counts: the peer's count.
            let update = signed_update(&entry)?;
            credits
                .entry((run.to_owned(), peer))
                .or_default()
                .add(&update, u64::from(update.n_samples));
        }
    }
    if credits.is_empty() {
        return Ok(());
    }
    let tx = db.begin_write()?;
    {
        let mut table = tx.open_table(CREDITS)?;
        for ((run, peer), credit) in &credits {
            table.insert(
                (run.as_str(), peer.as_slice()),
                postcard::to_allocvec(credit)?.as_slice(),
            )?;
        }
    }
    tx.commit()?;
    tracing::info!(peers = credits.len(), "credits rebuilt from the ledger");
    Ok(())
}

/// The run database, opened again after a failed write. Once a write hits an I/O error (a full
/// or failing disk) redb refuses every later transaction (`PreviousIo`) until the database is
/// closed and opened again, which repairs it; without this, a moment of a full disk would leave
/// the relay refusing every update and never announcing a round until it was restarted. What
/// failed stays failed (its caller got the error); what comes after works again as soon as the
/// disk does.
struct Db {
    open: Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>,
    /// `None` while a reopening failed (the next transaction tries again); the generation
    /// counts reopenings, so that threads that saw the same failure reopen once.
    current: RwLock<(Option<Database>, u64)>,
}

impl Db {
    fn new(
        open: impl Fn() -> Result<Database, redb::DatabaseError> + Send + Sync + 'static,
    ) -> anyhow::Result<Self> {
        let db = open()?;
        Ok(Self {
            open: Box::new(open),
            current: RwLock::new((Some(db), 0)),
        })
    }

    fn begin_read(&self) -> anyhow::Result<redb::ReadTransaction> {
        self.begin(Database::begin_read)
    }

    fn begin_write(&self) -> anyhow::Result<redb::WriteTransaction> {
        self.begin(Database::begin_write)
    }

    /// Begins a transaction, reopening the database first when an earlier write failed.
    fn begin<T>(
        &self,
        begin: impl Fn(&Database) -> Result<T, redb::TransactionError>,
    ) -> anyhow::Result<T> {
        let generation = {
            let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
            match &current.0 {
                Some(db) => match begin(db) {
                    Err(redb::TransactionError::Storage(redb::StorageError::PreviousIo)) => {
                        current.1
                    }
                    other => return Ok(other?),
                },
                None => current.1,
            }
        };
        self.reopen(generation)?;
        let current = self.current.read().unwrap_or_else(PoisonError::into_inner);
        let db = current.0.as_ref().context("the run database is closed")?;
        Ok(begin(db)?)
    }

    /// Closes and opens the database again, unless another thread already did since
    /// `generation`. redb holds the file's lock until the old database is dropped.
    fn reopen(&self, generation: u64) -> anyhow::Result<()> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        if current.1 != generation {
            return Ok(());
        }
        current.0 = None;
        current.1 += 1;
        let db = (self.open)().context("opening the run database again after a failed write")?;
        tracing::warn!("the run database was opened again after a failed write");
        current.0 = Some(db);
        Ok(())
    }
}

/// The relay's durable storage for its runs.
pub struct Store {
    db: Db,
    objects: Arc<dyn ObjectStore>,
    keep: usize,
    retention: Retention,
}

/// Checkpoints kept per run by default (older ones are deleted once a newer round is recorded).
pub const KEEP_CHECKPOINTS: usize = 10;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("objects", &self.objects.to_string())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating) `data_dir/state.redb`, with checkpoints under `data_dir/checkpoints`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Self> {
        let checkpoints = data_dir.join("checkpoints");
        std::fs::create_dir_all(&checkpoints)
            .with_context(|| format!("creating {}", checkpoints.display()))?;
        let objects = LocalFileSystem::new_with_prefix(&checkpoints)
            .context("opening the checkpoint directory")?;
        Self::open_with(data_dir, Arc::new(objects))
    }

    /// Opens the database in `data_dir` with checkpoints at `url`: `file:///path`, `memory://`
    /// or, in a relay built with the `s3` feature, `s3://bucket/prefix` (S3 or any S3-compatible
    /// store; credentials, region and endpoint come from the `AWS_*` environment variables, e.g.
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ENDPOINT`,
    /// `AWS_ALLOW_HTTP`).
    pub fn open_at(data_dir: &Path, url: &str) -> anyhow::Result<Self> {
        Self::open_at_with(
            data_dir,
            url,
            std::env::vars().filter(|(k, _)| k.starts_with("AWS_")),
        )
    }

    /// [`Store::open_at`] with the store's options given (`("aws_endpoint", "http://…")`, …)
    /// instead of read from the environment.
    pub fn open_at_with(
        data_dir: &Path,
        url: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url)
            .with_context(|| format!("checkpoint store {url:?} is not a URL"))?;
        let (objects, prefix) = object_store::parse_url_opts(&parsed, options).with_context(|| {
            format!("cannot open checkpoint store {url} (s3:// needs a relay built with the `s3` feature)")
        })?;
        let objects: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(objects)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(objects, prefix))
        };
        Self::open_with(data_dir, objects)
    }

    /// Opens the database in `data_dir` with checkpoints in `objects` (any object store).
    pub fn open_with(data_dir: &Path, objects: Arc<dyn ObjectStore>) -> anyhow::Result<Self> {
        let path = data_dir.join("state.redb");
        let db = Db::new(move || Database::create(&path))
            .with_context(|| format!("opening the run database in {}", data_dir.display()))?;
        Self::open_on(db, objects)
    }

    /// Opens the database that `open` opens (tests give it a disk that fails on demand).
    #[cfg(test)]
    pub(crate) fn open_with_database(
        open: impl Fn() -> Result<Database, redb::DatabaseError> + Send + Sync + 'static,
        objects: Arc<dyn ObjectStore>,
    ) -> anyhow::Result<Self> {
        Self::open_on(Db::new(open)?, objects)
    }

    fn open_on(db: Db, objects: Arc<dyn ObjectStore>) -> anyhow::Result<Self> {
        let tx = db.begin_write()?;
        tx.open_table(RUNS)?;
        tx.open_table(LEDGER)?;
        tx.open_table(COMPACTED)?;
        tx.open_table(HISTORY)?;
        tx.open_table(VERDICTS)?;
        let credits_missing = tx.open_table(CREDITS)?.is_empty()?;
        tx.commit()?;
        if credits_missing {
            backfill_credits(&db)?;
        }
        Ok(Self {
            db,
            objects,
            keep: KEEP_CHECKPOINTS,
            retention: Retention::default(),
        })
    }

    /// Deletes history rows and ledger entries past `retention` as rounds close.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// Up to `limit` history rows of `run_id` from round `from` on, oldest first.
    pub fn history(
        &self,
        run_id: &str,
        from: u64,
        limit: usize,
    ) -> anyhow::Result<Vec<RoundRecord>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(HISTORY)?;
        let mut rows = Vec::new();
        for item in table
            .range((run_id, from)..=(run_id, u64::MAX))?
            .take(limit)
        {
            let (_, value) = item?;
            rows.push(postcard::from_bytes(value.value()).context("a history row is corrupt")?);
        }
        Ok(rows)
    }

    /// The newest `limit` history rows of `run_id`, oldest first, and the oldest round kept.
    pub fn recent_history(
        &self,
        run_id: &str,
        limit: usize,
    ) -> anyhow::Result<(Vec<RoundRecord>, Option<u64>)> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(HISTORY)?;
        let range = table.range((run_id, 0)..=(run_id, u64::MAX))?;
        let mut rows = Vec::new();
        for item in range.rev().take(limit) {
            let (_, value) = item?;
            rows.push(postcard::from_bytes(value.value()).context("a history row is corrupt")?);
        }
        rows.reverse();
        let first = table
            .range((run_id, 0)..=(run_id, u64::MAX))?
            .next()
            .transpose()?
            .map(|(key, _)| key.value().1);
        Ok((rows, first))
    }

    /// Keeps the newest `keep` checkpoints of each run (at least 1).
    pub fn with_keep(mut self, keep: usize) -> Self {
        self.keep = keep.max(1);
        self
    }

    /// Deletes the checkpoints of `run_id` older than the newest `keep` before `round`, and
    /// drops the payloads of those rounds' ledger entries (see [`Store::compact_ledger`]).
    pub async fn prune(&self, run_id: &str, round: u64) -> anyhow::Result<usize> {
        self.compact_ledger(run_id, (round + 1).saturating_sub(self.keep as u64))?;
        use futures::TryStreamExt;
        let prefix = StorePath::from(run_id);
        let listed: Vec<_> = self
            .objects
            .list(Some(&prefix))
            .try_collect()
            .await
            .context("listing checkpoints")?;
        let mut deleted = 0;
        for meta in listed {
            let name = meta.location.filename().unwrap_or_default();
            let Some(r) = name
                .strip_prefix("round-")
                .and_then(|n| n.strip_suffix(".safetensors"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if r + (self.keep as u64) <= round {
                self.objects
                    .delete(&meta.location)
                    .await
                    .with_context(|| format!("deleting {}", meta.location))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Empties the payload of every ledger entry of `run_id` before round `before`, in one
    /// transaction; the entries themselves stay. Each round is compacted once.
    pub fn compact_ledger(&self, run_id: &str, before: u64) -> anyhow::Result<usize> {
        let tx = self.db.begin_write()?;
        let compacted = {
            let mut marks = tx.open_table(COMPACTED)?;
            let from = marks.get(run_id)?.map_or(0, |v| v.value());
            if from >= before {
                return Ok(0);
            }
            let mut ledger = tx.open_table(LEDGER)?;
            let low: (&str, u64, &[u8]) = (run_id, from, &[]);
            let high: (&str, u64, &[u8]) = (run_id, before, &[]);
            let mut rewritten = Vec::new();
            for item in ledger.range(low..high)? {
                let (key, value) = item?;
                let (_, round, peer) = key.value();
                // An entry that does not decode is left as it is: compaction only saves space,
                // and resuming reports such an entry for the open round.
                let Ok(mut entry) = postcard::from_bytes::<LedgerEntry>(value.value()) else {
                    tracing::warn!(
                        run_id,
                        round,
                        "a ledger entry does not decode; left uncompacted"
                    );
                    continue;
                };
                if !entry.payload.is_empty() {
                    entry.payload = Vec::new();
                    rewritten.push((round, peer.to_vec(), postcard::to_allocvec(&entry)?));
                }
            }
            for (round, peer, bytes) in &rewritten {
                ledger.insert((run_id, *round, peer.as_slice()), bytes.as_slice())?;
            }
            marks.insert(run_id, before)?;
            rewritten.len()
        };
        tx.commit()?;
        Ok(compacted)
    }

    pub fn run(&self, run_id: &str) -> anyhow::Result<Option<RunRecord>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(RUNS)?;
        let Some(bytes) = table.get(run_id)? else {
            return Ok(None);
        };
        let record = postcard::from_bytes(bytes.value())
            .context("the run record in the database is corrupt")?;
        Ok(Some(record))
    }

    /// Commits an accepted update; returns once it is durable.
    pub fn record_update(
        &self,
        run_id: &str,
        peer: &PeerKey,
        entry: &LedgerEntry,
        samples: u64,
    ) -> anyhow::Result<()> {
        let bytes = postcard::to_allocvec(entry)?;
        let update = signed_update(entry)?;
        let tx = self.db.begin_write()?;
        tx.open_table(LEDGER)?
            .insert((run_id, entry.round, peer.0.as_slice()), bytes.as_slice())?;
        {
            let mut credits = tx.open_table(CREDITS)?;
            let key = (run_id, peer.0.as_slice());
            let mut credit: Credit = match credits.get(key)? {
                Some(row) => Credit::decode(row.value())?,
                None => Credit::default(),
            };
            credit.add(&update, samples);
            credits.insert(key, postcard::to_allocvec(&credit)?.as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records the relay's signed verdicts on updates of `run_id` and settles each peer's
    /// credit by them, in one transaction. A verdict whose update is already settled (a check
    /// run twice) changes nothing.
    pub fn record_verdicts(
        &self,
        run_id: &str,
        verdicts: &[Signed<Verdict>],
    ) -> anyhow::Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(VERDICTS)?;
            let mut credits = tx.open_table(CREDITS)?;
            for signed in verdicts {
                let verdict: Verdict =
                    postcard::from_bytes(&signed.body).context("a verdict does not decode")?;
                let key = (run_id, verdict.round, verdict.peer.0.as_slice());
                if table.get(key)?.is_some() {
                    continue;
                }
                table.insert(key, postcard::to_allocvec(signed)?.as_slice())?;
                let credit_key = (run_id, verdict.peer.0.as_slice());
                let mut credit = match credits.get(credit_key)? {
                    Some(row) => Credit::decode(row.value())?,
                    None => Credit::default(),
                };
                credit.settle(&verdict.outcome, verdict.samples);
                credits.insert(credit_key, postcard::to_allocvec(&credit)?.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// `peer`'s verdicts in `run_id` for the rounds `rounds`, newest first (signed by the
    /// relay): one lookup a round.
    pub fn verdicts(
        &self,
        run_id: &str,
        peer: &PeerKey,
        rounds: std::ops::Range<u64>,
    ) -> anyhow::Result<Vec<Signed<Verdict>>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(VERDICTS)?;
        let mut out = Vec::new();
        for round in rounds.rev() {
            if let Some(value) = table.get((run_id, round, peer.0.as_slice()))? {
                out.push(postcard::from_bytes(value.value()).context("a verdict row is corrupt")?);
            }
        }
        Ok(out)
    }

    /// Every verdict on `run_id`'s `round`, in peer order (signed by the relay).
    pub fn round_verdicts(&self, run_id: &str, round: u64) -> anyhow::Result<Vec<Signed<Verdict>>> {
        Ok(self
            .round_rows(VERDICTS, run_id, round, "a verdict row")?
            .into_iter()
            .map(|(_, verdict)| verdict)
            .collect())
    }

    /// How many ledger entries and verdicts `run_id`'s `round` has (nothing decoded).
    pub fn round_counts(&self, run_id: &str, round: u64) -> anyhow::Result<(usize, usize)> {
        let tx = self.db.begin_read()?;
        let low: (&str, u64, &[u8]) = (run_id, round, &[]);
        let high: (&str, u64, &[u8]) = (run_id, round, &[0xff; 33]);
        let entries = tx.open_table(LEDGER)?.range(low..high)?.count();
        let verdicts = tx.open_table(VERDICTS)?.range(low..high)?.count();
        Ok((entries, verdicts))
    }

    /// The rows of a (run, round, peer)-keyed `table` for `run_id`'s `round`, in peer order,
    /// decoded (`what` names them in errors).
    fn round_rows<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<(&str, u64, &[u8]), &[u8]>,
        run_id: &str,
        round: u64,
        what: &str,
    ) -> anyhow::Result<Vec<(PeerKey, T)>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(table)?;
        let low: (&str, u64, &[u8]) = (run_id, round, &[]);
        let high: (&str, u64, &[u8]) = (run_id, round, &[0xff; 33]);
        let mut out = Vec::new();
        for item in table.range(low..high)? {
            let (key, value) = item?;
            let (_, _, peer) = key.value();
            let peer: [u8; 32] = peer
                .try_into()
                .with_context(|| format!("{what} has a bad peer key"))?;
            out.push((
                PeerKey(peer),
                postcard::from_bytes(value.value())
                    .with_context(|| format!("{what} is corrupt"))?,
            ));
        }
        Ok(out)
    }

    /// Every peer's credit in `run_id`, in peer order.
    pub fn credits(&self, run_id: &str) -> anyhow::Result<Vec<(PeerKey, Credit)>> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(CREDITS)?;
        let low: (&str, &[u8]) = (run_id, &[]);
        let high: (&str, &[u8]) = (run_id, &[0xff; 33]);
        let mut out = Vec::new();
        for item in table.range(low..high)? {
            let (key, value) = item?;
            let (_, peer) = key.value();
            let peer: [u8; 32] = peer.try_into().context("a credit key has a bad peer key")?;
            out.push((PeerKey(peer), Credit::decode(value.value())?));
        }
        Ok(out)
    }

    /// The ledger's updates for `round`, in peer order.
    pub fn updates(&self, run_id: &str, round: u64) -> anyhow::Result<Vec<(PeerKey, LedgerEntry)>> {
        self.round_rows(LEDGER, run_id, round, "a ledger entry")
    }

    /// Writes the checkpoint of `round` (θ and the outer momentum, the tensor
    /// `outer.velocity` after the model's) with `describe` in its metadata besides the format,
    /// run and round, and returns its key.
    pub async fn write_checkpoint(
        &self,
        run_id: &str,
        round: u64,
        layout: &[TensorInfo],
        params: &[f32],
        velocity: &[f32],
        describe: &BTreeMap<String, String>,
    ) -> anyhow::Result<String> {
        let mut tensors = layout.to_vec();
        tensors.push(TensorInfo {
            name: "outer.velocity".into(),
            shape: vec![velocity.len()],
        });
        let values: Vec<f32> = params.iter().chain(velocity).copied().collect();
        let mut metadata = describe.clone();
        metadata.extend([
            ("format".to_owned(), "swarmtrain".to_owned()),
            ("run_id".to_owned(), run_id.to_owned()),
            ("round".to_owned(), round.to_string()),
            (
                "outer.velocity".to_owned(),
                "the outer Nesterov momentum (not a model tensor)".to_owned(),
            ),
        ]);
        let bytes = checkpoint::to_safetensors(&tensors, &values, &metadata)?;
        let key = format!("{run_id}/round-{round:08}.safetensors");
        // The local store writes a temporary file and renames it: never a torn checkpoint.
        self.objects
            .put(&StorePath::from(key.as_str()), bytes.into())
            .await
            .with_context(|| format!("writing checkpoint {key}"))?;
        Ok(key)
    }

    /// Reads the checkpoint file `key` as it is: its tensors and its metadata.
    pub async fn read_checkpoint_file(&self, key: &str) -> anyhow::Result<checkpoint::Checkpoint> {
        let bytes = self
            .objects
            .get(&StorePath::from(key))
            .await
            .with_context(|| format!("reading checkpoint {key}"))?
            .bytes()
            .await?;
        checkpoint::from_safetensors(&bytes).with_context(|| format!("checkpoint {key}"))
    }

    /// Reads a checkpoint back: (θ, outer momentum), checked against the model's layout.
    pub async fn read_checkpoint(
        &self,
        key: &str,
        layout: &[TensorInfo],
    ) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let file = self.read_checkpoint_file(key).await?;
        let n: usize = layout
            .iter()
            .map(|t| t.shape.iter().product::<usize>())
            .sum();
        let names: Vec<&str> = file.tensors.iter().map(|(t, _)| t.name.as_str()).collect();
        let expected: Vec<&str> = layout
            .iter()
            .map(|t| t.name.as_str())
            .chain(["outer.velocity"])
            .collect();
        anyhow::ensure!(
            names == expected,
            "checkpoint {key} holds {names:?}, this run's model needs {expected:?}"
        );
        let mut flat = file.flat();
        let velocity = flat.split_off(n);
        anyhow::ensure!(
            velocity.len() == n,
            "checkpoint {key}: momentum has {} values, expected {n}",
            velocity.len()
        );
        Ok((flat, velocity))
    }

    /// Switches the run's record (open round, checkpoint, counters) and adds the round's
    /// history row in one transaction; deletes what the retention policy no longer keeps.
    pub fn commit_round(
        &self,
        run_id: &str,
        record: &RunRecord,
        row: &RoundRecord,
    ) -> anyhow::Result<()> {
        let bytes = postcard::to_allocvec(record)?;
        let row_bytes = postcard::to_allocvec(row)?;
        let tx = self.db.begin_write()?;
        tx.open_table(RUNS)?.insert(run_id, bytes.as_slice())?;
        {
            let mut history = tx.open_table(HISTORY)?;
            history.insert((run_id, row.round), row_bytes.as_slice())?;
            if let Some(keep) = self.retention.history_rounds {
                let before = (record.round + 1).saturating_sub(keep.max(1));
                history.retain_in((run_id, 0)..(run_id, before), |_, _| false)?;
            }
        }
        if let Some(keep) = self.retention.ledger_rounds {
            let before = (record.round + 1).saturating_sub(keep.max(self.keep as u64));
            let low: (&str, u64, &[u8]) = (run_id, 0, &[]);
            let high: (&str, u64, &[u8]) = (run_id, before, &[]);
            tx.open_table(LEDGER)?.retain_in(low..high, |_, _| false)?;
            tx.open_table(VERDICTS)?
                .retain_in(low..high, |_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn checkpoints_go_to_the_store_named_by_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/ckpt", elsewhere.path().display());
        std::fs::create_dir_all(elsewhere.path().join("ckpt")).expect("mkdir");
        let store = Store::open_at(dir.path(), &url).expect("open");
        let layout = [TensorInfo {
            name: "w".into(),
            shape: vec![2],
        }];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let key = store
                .write_checkpoint(
                    "run",
                    3,
                    &layout,
                    &[1.0, 2.0],
                    &[0.0, 0.5],
                    &Default::default(),
                )
                .await
                .expect("write");
            assert!(
                elsewhere.path().join("ckpt").join(&key).is_file(),
                "written under the URL's path"
            );
            assert_eq!(
                store.read_checkpoint(&key, &layout).await.expect("read"),
                (vec![1.0, 2.0], vec![0.0, 0.5])
            );
        });
        assert!(Store::open_at(dir.path(), "not a url").is_err());
        let err = Store::open_at(dir.path(), "nosuch://bucket/x")
            .map(|_| ())
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot open checkpoint store"),
            "{err:#}"
        );
    }

    #[test]
    fn old_checkpoints_are_pruned_and_the_newest_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open").with_keep(2);
        let layout = [TensorInfo {
            name: "w".into(),
            shape: vec![3],
        }];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for round in 0..6u64 {
                let key = store
                    .write_checkpoint(
                        "run",
                        round,
                        &layout,
                        &[round as f32; 3],
                        &[0.5; 3],
                        &Default::default(),
                    )
                    .await
                    .expect("write");
                store.prune("run", round).await.expect("prune");
                assert_eq!(key, format!("run/round-{round:08}.safetensors"));
            }
            let left: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints/run"))
                .expect("dir")
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(
                left,
                ["round-00000004.safetensors", "round-00000005.safetensors"]
            );
            let (params, velocity) = store
                .read_checkpoint("run/round-00000005.safetensors", &layout)
                .await
                .expect("read");
            assert_eq!((params, velocity), (vec![5.0; 3], vec![0.5; 3]));
            let wrong = [TensorInfo {
                name: "v".into(),
                shape: vec![3],
            }];
            assert!(
                store
                    .read_checkpoint("run/round-00000005.safetensors", &wrong)
                    .await
                    .is_err(),
                "another model's checkpoint"
            );
            assert!(
                store
                    .read_checkpoint("run/round-00000001.safetensors", &layout)
                    .await
                    .is_err(),
                "pruned"
            );
        });
    }

    pub(super) fn entry(round: u64, payload: Vec<u8>) -> LedgerEntry {
        let update = Update {
            run_id: "run".into(),
            round,
            base: swarmtrain_shared::protocol::ParamsHash([round as u8; 32]),
            n_samples: 64,
            inner_steps: 2,
            loss: 0.5,
            codec: swarmtrain_shared::compress::Codec::F32,
            payload: swarmtrain_shared::protocol::PayloadRef::of(&payload),
            state: swarmtrain_shared::protocol::PayloadRef::of(&[]),
        };
        let envelope = Envelope {
            peer_id: vec![1; 38],
            seq: round,
            expires_ms: 1,
            message: ClientToRelay::Update(update),
        };
        LedgerEntry {
            received_ms: 1000 + round,
            round,
            signed: swarmtrain_shared::Identity::from_seed([1; 32])
                .sign(&envelope)
                .expect("sign"),
            payload,
        }
    }

    /// A disk that fails every write, resize and sync while `full` is set (as a full disk
    /// does), under the real redb file.
    #[derive(Debug)]
    pub(crate) struct FailingDisk {
        file: redb::backends::FileBackend,
        full: Arc<std::sync::atomic::AtomicBool>,
    }

    impl FailingDisk {
        /// Opens the database `path` on a disk that fails while `full` is set.
        pub(crate) fn database(
            path: std::path::PathBuf,
            full: Arc<std::sync::atomic::AtomicBool>,
        ) -> impl Fn() -> Result<Database, redb::DatabaseError> + Send + Sync + 'static {
            move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                let disk = FailingDisk {
                    file: redb::backends::FileBackend::new(file)?,
                    full: full.clone(),
                };
                Database::builder().create_with_backend(disk)
            }
        }

        fn check(&self) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "no space left on device",
                ));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FailingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    /// A write that fails on a full disk is an error to its caller, and the store takes writes
    /// again once the disk does (redb alone would refuse every later one until reopened), with
    /// nothing that was acknowledged lost.
    #[test]
    fn a_failed_write_is_an_error_and_the_store_writes_again_once_the_disk_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let path = dir.path().join("state.redb");
        let open = || {
            Store::open_with_database(
                FailingDisk::database(path.clone(), full.clone()),
                Arc::new(object_store::memory::InMemory::new()),
            )
            .expect("open")
        };
        let store = open();
        let peer = PeerKey([1; 32]);
        store
            .record_update("run", &peer, &entry(0, vec![1; 10]), 8)
            .expect("recorded");
        full.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(
            store
                .record_update("run", &peer, &entry(1, vec![2; 10]), 8)
                .is_err(),
            "a write the disk refuses is an error"
        );
        full.store(false, std::sync::atomic::Ordering::SeqCst);
        store
            .record_update("run", &peer, &entry(2, vec![3; 10]), 8)
            .expect("the store writes again once the disk does");
        let rounds = |store: &Store| -> Vec<u64> {
            (0..3)
                .filter(|r| !store.updates("run", *r).expect("ledger").is_empty())
                .collect()
        };
        assert_eq!(rounds(&store), vec![0, 2], "the refused write left nothing");
        assert_eq!(
            store.credits("run").expect("credits")[0].1.samples,
            16,
            "credit for the two acknowledged updates"
        );
        drop(store);
        let reopened = open();
        assert_eq!(rounds(&reopened), vec![0, 2], "durable across a restart");
    }

    #[test]
    fn history_is_one_row_a_round_and_retention_bounds_history_and_ledger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path())
            .expect("open")
            .with_keep(2)
            .with_retention(Retention {
                history_rounds: Some(5),
                ledger_rounds: Some(3),
            });
        let row = |round| RoundRecord {
            round,
            accuracy: None,
            val_loss: Some(round as f32),
            contributors: 1,
            samples: 8,
            mean_loss: None,
            closed_at_ms: round,
            aggregation_ms: 0.0,
        };
        for round in 0..20u64 {
            store
                .record_update("run", &PeerKey([1; 32]), &entry(round, vec![1; 10]), 8)
                .expect("record");
            let record = RunRecord {
                round,
                checkpoint: format!("run/round-{round:08}.safetensors"),
                accuracy: None,
                loss: Some(round as f32),
                accepted: round + 1,
                rejected: BTreeMap::new(),
            };
            store
                .commit_round("run", &record, &row(round))
                .expect("commit");
        }
        let (recent, first) = store.recent_history("run", 3).expect("history");
        assert_eq!(recent, vec![row(17), row(18), row(19)]);
        assert_eq!(first, Some(15), "five rounds of history kept");
        assert_eq!(
            store.history("run", 0, 100).expect("history"),
            (15..20).map(row).collect::<Vec<_>>()
        );
        assert_eq!(store.history("run", 18, 1).expect("page"), vec![row(18)]);
        let kept: Vec<u64> = (0..20)
            .filter(|r| !store.updates("run", *r).expect("ledger").is_empty())
            .collect();
        assert_eq!(kept, vec![17, 18, 19], "three rounds of ledger kept");
        assert_eq!(store.run("run").expect("read").expect("record").round, 19);
    }

    #[test]
    fn ledger_payloads_are_kept_as_long_as_their_checkpoints_and_the_entries_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = [TensorInfo {
            name: "w".into(),
            shape: vec![1],
        }];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        {
            let store = Store::open(dir.path()).expect("open").with_keep(2);
            rt.block_on(async {
                for round in 0..5u64 {
                    for peer in 0..3u8 {
                        store
                            .record_update(
                                "run",
                                &PeerKey([peer; 32]),
                                &entry(round, vec![peer; 100]),
                                8,
                            )
                            .expect("record");
                    }
                    store
                        .record_update("other", &PeerKey([9; 32]), &entry(round, vec![9; 100]), 8)
                        .expect("record");
                    store
                        .write_checkpoint(
                            "run",
                            round,
                            &layout,
                            &[0.0],
                            &[0.0],
                            &Default::default(),
                        )
                        .await
                        .expect("write");
                    store.prune("run", round).await.expect("prune");
                }
            });
            // Checkpoints 3 and 4 are kept, and so are the payloads of rounds 3 and 4.
            for round in 0..5u64 {
                let updates = store.updates("run", round).expect("updates");
                assert_eq!(updates.len(), 3, "round {round}: every entry stays");
                for (peer, got) in &updates {
                    let mut want = entry(round, vec![peer.0[0]; 100]);
                    if round < 3 {
                        want.payload.clear();
                    }
                    assert_eq!(got, &want, "round {round}");
                    // Compacted or not, the entry still says who sent what.
                    let (signer, update) = got.verify().expect("verifies");
                    assert_eq!(
                        signer,
                        swarmtrain_shared::Identity::from_seed([1; 32]).peer()
                    );
                    assert_eq!(update.round, round);
                }
            }
            // Another run's ledger is untouched, and compacting again changes nothing.
            assert_eq!(
                store.updates("other", 0).expect("updates")[0]
                    .1
                    .payload
                    .len(),
                100
            );
            assert_eq!(store.compact_ledger("run", 3).expect("compact"), 0);
        }
        // The mark survives a reopen: only newer rounds are compacted then.
        let store = Store::open(dir.path()).expect("reopen").with_keep(2);
        assert_eq!(store.compact_ledger("run", 4).expect("compact"), 3);
        assert!(
            store
                .updates("run", 3)
                .expect("updates")
                .iter()
                .all(|(_, e)| e.payload.is_empty())
        );
        assert_eq!(
            store.updates("run", 4).expect("updates")[0].1.payload.len(),
            100
        );
    }
}

#[cfg(test)]
mod credit_tests {
    use super::*;

    #[test]
    fn credits_add_up_accepted_updates_survive_reopening_and_are_rebuilt_from_the_ledger() {
        let dir = tempfile::tempdir().expect("tempdir");
        let peer = PeerKey([1; 32]);
        let expected = Credit {
            accepted_updates: 3,
            samples: 3 * 64,
            inner_steps: 3 * 2,
            first_round: 4,
            last_round: 6,
            ..Credit::default()
        };
        {
            let store = Store::open(dir.path()).expect("open");
            for round in [5, 4, 6] {
                store
                    .record_update("run", &peer, &tests::entry(round, vec![1; 10]), 64)
                    .expect("record");
            }
            assert_eq!(
                store.credits("run").expect("credits"),
                vec![(peer, expected.clone())]
            );
            assert!(store.credits("other").expect("credits").is_empty());
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.credits("run").expect("credits"),
            vec![(peer, expected.clone())]
        );

        // A data directory from before credits existed: the table is rebuilt from the ledger.
        let tx = store.db.begin_write().expect("tx");
        tx.delete_table(CREDITS).expect("drop the credits");
        tx.commit().expect("commit");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            store.credits("run").expect("credits"),
            vec![(peer, expected.clone())]
        );

        // The relay's verdicts settle the samples: verified, failed, the rest unchecked; a
        // verdict recorded twice counts once. They are kept, signed, per round.
        let relay = swarmtrain_shared::Identity::from_seed([3; 32]);
        let verdict = |round: u64, outcome: Outcome| {
            relay
                .sign(&Verdict {
                    run_id: "run".into(),
                    round,
                    peer,
                    payload: [0; 32],
                    samples: 64,
                    check: None,
                    replay: None,
                    outcome,
                })
                .expect("sign")
        };
        let failed = Outcome::Failed {
            reason: "test".into(),
        };
        let verdicts = [verdict(4, Outcome::Verified), verdict(5, failed)];
        store.record_verdicts("run", &verdicts).expect("verdicts");
        store.record_verdicts("run", &verdicts[..1]).expect("again");
        let (_, credit) = store.credits("run").expect("credits").remove(0);
        assert_eq!(
            (
                credit.verified_samples,
                credit.failed_samples,
                credit.unchecked_samples()
            ),
            (64, 64, 64)
        );
        assert_eq!(credit.earned_samples(), 128, "failed samples earn nothing");
        let kept = store.verdicts("run", &peer, 0..10).expect("verdicts");
        assert_eq!(
            kept.iter()
                .map(|v| v.verify_and_decode().expect("signed").1.round)
                .collect::<Vec<_>>(),
            [5, 4]
        );

        // A credit row as relays before the checks wrote it reads as all unchecked.
        #[derive(Serialize)]
        struct V1(u64, u64, u64, u64, u64);
        let old = postcard::to_allocvec(&V1(3, 192, 6, 4, 6)).expect("encode");
        assert_eq!(Credit::decode(&old).expect("decode"), expected);
    }
}
