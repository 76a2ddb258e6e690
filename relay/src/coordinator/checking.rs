//! Checking the work behind updates: the loss check of drawn updates, replays of drawn rounds
//! (by the relay or by volunteer verifiers), and the signed verdicts that settle credit.

use super::*;

/// Volunteer verifiers (`swarmtrain-peer verify`, joined with [`Role::Verify`]) and the replays
/// given to them. Kept in memory only: after a restart verifiers ask again, and a job that was
/// out is not replayed (its update stays unchecked).
#[derive(Debug, Default)]
pub(super) struct Verifiers {
    /// When each verifier last asked for work or reported (relay ms).
    pub(super) seen: BTreeMap<PeerKey, u64>,
    /// Verifiers whose report the relay's own replay contradicted: refused from then on (at
    /// most [`MAX_BANNED_VERIFIERS`] remembered).
    pub(super) banned: BTreeSet<PeerKey>,
    /// Replays waiting for a verifier or given to one, by job number.
    pub(super) jobs: BTreeMap<u64, Job>,
    pub(super) next_job: u64,
    /// Verifiers' reports by what became of them (`trusted`, `confirmed`, `caught`, `unable`,
    /// `timeout`).
    pub(super) outcomes: BTreeMap<&'static str, u64>,
}

/// A replay's conclusion: the update, the replay (if one ran), the outcome, and the label it
/// is counted under.
pub(super) type Replay = (Audit, Option<ReplayCheck>, Outcome, &'static str);

/// What a verifier asking for work after it was banned hears.
pub(super) const VERIFIER_BANNED: &str =
    "a replay of yours contradicted the relay's own: this identity no longer verifies for this run";

/// Banned verifiers a run remembers at most.
const MAX_BANNED_VERIFIERS: usize = 4096;
/// A verifier's long poll for a job waits at most this long.
const VERIFY_POLL: Duration = Duration::from_secs(10);

/// A revealed update waiting for a verifier, or given to one.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) audit: Audit,
    pub(super) state: bytes::Bytes,
    pub(super) verifier: Option<PeerKey>,
}

impl Verifiers {
    /// Whether a verifier other than `peer` has been heard from within `within_ms`.
    pub(super) fn any_active(&self, now_ms: u64, within_ms: u64, peer: &PeerKey) -> bool {
        self.seen
            .iter()
            .any(|(v, t)| v != peer && now_ms.saturating_sub(*t) <= within_ms)
    }

    /// Gives `verifier` the oldest job nobody holds that is not its own update's.
    pub(super) fn take(&mut self, verifier: PeerKey) -> Option<(u64, &Job)> {
        let (id, job) = self
            .jobs
            .iter_mut()
            .find(|(_, job)| job.verifier.is_none() && job.audit.peer != verifier)?;
        job.verifier = Some(verifier);
        Some((*id, &*job))
    }

    pub(super) fn ban(&mut self, verifier: PeerKey) {
        if self.banned.len() >= MAX_BANNED_VERIFIERS
            && let Some(first) = self.banned.first().copied()
        {
            self.banned.remove(&first);
        }
        self.banned.insert(verifier);
        self.seen.remove(&verifier);
    }
}

impl Coordinator {
    /// Draws the closing round's updates to replay: each with probability
    /// `replays.fraction`, at most `replays.per_round`, with the OS's randomness. The drawn
    /// claims are taken out of `claims` (the loss check's).
    pub(super) fn draw_audits(
        &self,
        state: &State,
        claims: &mut BTreeMap<PeerKey, Claim>,
        round: u64,
        theta: &[f32],
    ) -> BTreeMap<PeerKey, Audit> {
        if self.replays.fraction <= 0.0 || self.spec.model.lm_config().is_none() {
            return BTreeMap::new();
        }
        let mut drawn: Vec<PeerKey> = claims
            .keys()
            .filter(|_| rand::random::<f64>() < self.replays.fraction)
            .copied()
            .collect();
        let drawn = swarmtrain_shared::data::SplitMix64::new(rand::random())
            .choose(&mut drawn, self.replays.per_round)
            .to_vec();
        if drawn.is_empty() {
            return BTreeMap::new();
        }
        let theta_hash = ParamsHash::of(&protocol::params_to_bytes(theta));
        let theta = Arc::new(theta.to_vec());
        drawn
            .into_iter()
            .filter_map(|peer| {
                let delta = state.round.contribution(&peer)?.delta.clone();
                let claim = claims.remove(&peer)?;
                Some((
                    peer,
                    Audit {
                        peer,
                        round,
                        theta: theta.clone(),
                        theta_hash,
                        delta,
                        claim,
                    },
                ))
            })
            .collect()
    }

    /// A peer's [`Reveal`] of the state its drawn update committed to: checked against the
    /// commitment at once (a state that is not the committed one fails the update and is a
    /// strike), then replayed off the round's path ([`Self::replay`]).
    pub(super) async fn reveal(
        self: &Arc<Self>,
        peer: PeerKey,
        reveal: Reveal,
        payload: Vec<u8>,
    ) -> Answer {
        let mut state = self.state.lock().await;
        if !state.joined.contains_key(&peer) {
            drop(state);
            let reason = "send a Join for this run before a reveal".to_owned();
            return Err(self
                .reject(Some(peer), RefusalKind::NotJoined, reason)
                .await);
        }
        let pending = state.audits.get(&peer).map(|a| a.round);
        if pending != Some(reveal.round) {
            drop(state);
            let reason = match pending {
                Some(round) => format!(
                    "the relay replays your update of round {round}, not {}",
                    reveal.round
                ),
                None => format!(
                    "no replay of your update of round {} is pending",
                    reveal.round
                ),
            };
            return Err(self
                .reject(Some(peer), RefusalKind::NotAudited, reason)
                .await);
        }
        let Some(audit) = state.audits.remove(&peer) else {
            return Err(self
                .reject(
                    Some(peer),
                    RefusalKind::Internal,
                    "the audit vanished".into(),
                )
                .await);
        };
        state.reveal_bytes += payload.len() as u64;
        drop(state);
        if reveal.state != audit.claim.state || !reveal.state.matches(&payload) {
            let reason = "the revealed state is not the one its update committed to".to_owned();
            self.conclude_replays(vec![(
                audit,
                None,
                Outcome::Failed {
                    reason: reason.clone(),
                },
                "mismatch",
            )])
            .await;
            // The refusal itself is the strike.
            return Err(self
                .reject(Some(peer), RefusalKind::RevealMismatch, reason)
                .await);
        }
        let round = audit.round;
        self.dispatch(audit, payload.into()).await;
        Ok(RelayToClient::Revealed { round })
    }

    /// Sends a revealed update to its replay: to the volunteer verifiers when one (not its
    /// peer) has been heard from within the verifier timeout and fewer than two rounds' worth
    /// of jobs wait for them, else to the relay's own replay lane. A job no verifier has
    /// reported on within the timeout is replayed by the relay.
    pub(super) async fn dispatch(self: &Arc<Self>, audit: Audit, state: bytes::Bytes) {
        let timeout = self.replays.verifier_timeout;
        let now = self.now_ms();
        let id = {
            let mut guard = self.state.lock().await;
            let verifiers = &mut guard.verifiers;
            let room = verifiers.jobs.len() < 2 * self.replays.per_round.max(1);
            if room && verifiers.any_active(now, timeout.as_millis() as u64, &audit.peer) {
                let id = verifiers.next_job;
                verifiers.next_job += 1;
                verifiers.jobs.insert(
                    id,
                    Job {
                        audit,
                        state,
                        verifier: None,
                    },
                );
                Ok(id)
            } else {
                Err((audit, state))
            }
        };
        let this = self.clone();
        match id {
            Ok(id) => {
                self.jobs_ready.notify_waiters();
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    let job = this.state.lock().await.verifiers.jobs.remove(&id);
                    if let Some(job) = job {
                        if let Some(verifier) = job.verifier {
                            tracing::warn!(
                                verifier = verifier.short(),
                                job = id,
                                "a verifier did not report in time; the relay replays the update"
                            );
                            this.count_verifier("timeout").await;
                        }
                        this.replay(job.audit, job.state).await;
                    }
                });
            }
            Err((audit, state)) => {
                tokio::spawn(async move { this.replay(audit, state).await });
            }
        }
    }

    /// A verifier's long poll for work: the oldest waiting job that is not its own update's,
    /// or none after [`VERIFY_POLL`] (or `max_wait`, if shorter).
    pub(super) async fn give_job(self: &Arc<Self>, peer: PeerKey, max_wait: Duration) -> Answer {
        let until = tokio::time::Instant::now() + max_wait.min(VERIFY_POLL);
        loop {
            let ready = self.jobs_ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut state = self.state.lock().await;
                let refused = if state.verifiers.banned.contains(&peer) {
                    Some((RefusalKind::VerifierBanned, VERIFIER_BANNED))
                } else if state.joined.get(&peer).map(|j| j.0) != Some(Role::Verify) {
                    Some((
                        RefusalKind::NotJoined,
                        "join this run as a verifier (role Verify) before asking for replays",
                    ))
                } else {
                    None
                };
                if let Some((kind, reason)) = refused {
                    drop(state);
                    return Err(self.reject(Some(peer), kind, reason.to_owned()).await);
                }
                let now = self.now_ms();
                state.verifiers.seen.insert(peer, now);
                if let Some((id, job)) = state.verifiers.take(peer) {
                    let job = ReplayJob {
                        job: id,
                        round: job.audit.round,
                        theta: job.audit.theta_hash,
                        slot: job.audit.claim.slot,
                        steps: job.audit.claim.steps,
                        state: job.audit.claim.state,
                    };
                    drop(state);
                    tracing::info!(
                        verifier = peer.short(),
                        job = id,
                        round = job.round,
                        "gave a replay to a verifier"
                    );
                    return Ok(RelayToClient::Job(Some(job)));
                }
            }
            if tokio::time::timeout_at(until, ready).await.is_err() {
                return Ok(RelayToClient::Job(None));
            }
        }
    }

    /// A verifier's [`Replayed`] report: the payload its replay gave is compared with the
    /// update here ([`checks::compare`]) and settled off the caller's path
    /// ([`Self::settle_report`]).
    pub(super) async fn replayed(
        self: &Arc<Self>,
        peer: PeerKey,
        report: Replayed,
        payload: Vec<u8>,
    ) -> Answer {
        let job = {
            let mut state = self.state.lock().await;
            let held = state
                .verifiers
                .jobs
                .get(&report.job)
                .is_some_and(|job| job.verifier == Some(peer));
            if held {
                let now = self.now_ms();
                state.verifiers.seen.insert(peer, now);
                state.verifiers.jobs.remove(&report.job)
            } else {
                None
            }
        };
        let Some(job) = job else {
            let reason = format!(
                "job {} is not yours (or it timed out and the relay replays it)",
                report.job
            );
            return Err(self
                .reject(Some(peer), RefusalKind::UnknownJob, reason)
                .await);
        };
        let round = job.audit.round;
        let check = match report.update {
            Some(update) if update.matches(&payload) => {
                Some(checks::compare(&self.spec, &job.audit, &payload))
            }
            _ => None,
        };
        let this = self.clone();
        tokio::spawn(async move { this.settle_report(peer, job, check).await });
        Ok(RelayToClient::Accepted { round })
    }

    /// Settles a verifier's report. A verifier that could not replay (`check` is `None`)
    /// leaves the replay to the relay. A replay that verifies the update is kept as the
    /// verdict (`trusted`) unless drawn for a spot check (`replays.spot_check`); one that
    /// fails it, and every spot check, is replayed by the relay, whose verdict is the one
    /// kept: the verifier is `confirmed` when both agree, and `caught` (banned as a verifier,
    /// and a strike) when they do not.
    pub(super) async fn settle_report(
        self: Arc<Self>,
        verifier: PeerKey,
        job: Job,
        check: Option<ReplayCheck>,
    ) {
        let Some(check) = check else {
            self.count_verifier("unable").await;
            return self.replay(job.audit, job.state).await;
        };
        let reported = replay::judge(&check, self.replays.tolerance);
        let verified = matches!(reported, Outcome::Verified);
        let label = |check: &ReplayCheck| if check.exact { "exact" } else { "near" };
        if verified && rand::random::<f64>() >= self.replays.spot_check {
            self.count_verifier("trusted").await;
            let conclusion = (job.audit, Some(check), reported, label(&check));
            return self.conclude_replays(vec![conclusion]).await;
        }
        let Some(here) = self.clone().replay_here(job.audit, job.state).await else {
            return;
        };
        if here.3 == "behind" {
            // The relay cannot check now: a verified report stands, a failing one does not.
            if verified {
                self.count_verifier("trusted").await;
                let conclusion = (here.0, Some(check), reported, label(&check));
                return self.conclude_replays(vec![conclusion]).await;
            }
            return self.conclude_replays(vec![here]).await;
        }
        if matches!(here.2, Outcome::Verified) == verified {
            self.count_verifier("confirmed").await;
        } else {
            tracing::warn!(
                verifier = verifier.short(),
                round = here.0.round,
                peer = here.0.peer.short(),
                reported = reported.label(),
                replayed = here.2.label(),
                "a verifier's replay contradicts the relay's: it is banned as a verifier"
            );
            self.count_verifier("caught").await;
            self.state.lock().await.verifiers.ban(verifier);
            // Its parked ask, if any, hears the refusal now.
            self.jobs_ready.notify_waiters();
            self.strike(verifier);
        }
        self.conclude_replays(vec![here]).await;
    }

    pub(super) async fn count_verifier(&self, outcome: &'static str) {
        *self
            .state
            .lock()
            .await
            .verifiers
            .outcomes
            .entry(outcome)
            .or_default() += 1;
    }

    /// Reports `peer` for a strike (the libp2p loop keeps strikes).
    pub(super) fn strike(&self, peer: PeerKey) {
        if let Some(strikes) = &self.strikes
            && strikes.try_send(peer).is_err()
        {
            tracing::warn!(
                peer = peer.short(),
                "the strike queue is full; strike dropped"
            );
        }
    }

    /// Replays a revealed update here ([`Self::replay_here`]) and concludes it.
    pub(super) async fn replay(self: Arc<Self>, audit: Audit, state: bytes::Bytes) {
        if let Some(conclusion) = self.clone().replay_here(audit, state).await {
            self.conclude_replays(vec![conclusion]).await;
        }
    }

    /// Replays a revealed update ([`checks::replay_update`]) in the replay lane (one at a
    /// time per run, beside the loss checks) and returns its conclusion, labelled. More than
    /// two rounds' worth of replays waiting and the update is not replayed (`behind`: it stays
    /// unchecked); `None` if the replay itself broke down.
    pub(super) async fn replay_here(
        self: Arc<Self>,
        audit: Audit,
        state: bytes::Bytes,
    ) -> Option<Replay> {
        use std::sync::atomic::Ordering;
        let queued = self.replays_queued.fetch_add(1, Ordering::AcqRel);
        if queued >= 2 * self.replays.per_round.max(1) {
            self.replays_queued.fetch_sub(1, Ordering::AcqRel);
            let reason = "the relay's replays were behind by more than two rounds".to_owned();
            tracing::warn!(
                run = self.spec.run_id,
                round = audit.round,
                "{reason}; not replayed"
            );
            return Some((audit, None, Outcome::Inconclusive { reason }, "behind"));
        }
        let lane = self.replay_lane.lock().await;
        let this = self.clone();
        let started = std::time::Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            let (check, outcome) =
                checks::replay_update(&this.spec, &this.data, &this.replays, &audit, &state);
            (audit, check, outcome)
        })
        .await;
        drop(lane);
        self.replays_queued.fetch_sub(1, Ordering::AcqRel);
        match done {
            Ok((audit, check, outcome)) => {
                tracing::info!(
                    run = self.spec.run_id,
                    round = audit.round,
                    peer = audit.peer.short(),
                    ms = started.elapsed().as_millis() as u64,
                    ?check,
                    outcome = outcome.label(),
                    "replayed an update"
                );
                let label = match (&check, &outcome) {
                    (Some(c), Outcome::Verified) if c.exact => "exact",
                    (_, Outcome::Verified) => "near",
                    (_, Outcome::Failed { .. }) if check.is_some() => "differs",
                    (_, Outcome::Failed { .. }) => "bad_reveal",
                    (_, Outcome::Inconclusive { .. }) => "behind",
                };
                Some((audit, check, outcome, label))
            }
            Err(e) => {
                tracing::error!(error = %e, "a replay failed; its update stays unchecked");
                None
            }
        }
    }

    /// Signs and records the verdicts of replays (counted under their labels); a failed one is
    /// also a strike against its peer.
    pub(super) async fn conclude_replays(&self, replays: Vec<Replay>) {
        let mut verdicts = Vec::with_capacity(replays.len());
        {
            let mut state = self.state.lock().await;
            for (_, _, _, label) in &replays {
                *state.replay_outcomes.entry(label).or_default() += 1;
            }
        }
        for (audit, replay, outcome, label) in replays {
            let peer = audit.peer;
            if let Outcome::Failed { reason } = &outcome {
                tracing::warn!(peer = peer.short(), round = audit.round, %reason, label, "an update failed its replay: it earns no credit");
                if label != "mismatch" {
                    self.strike(peer);
                }
            }
            verdicts.push(Verdict {
                run_id: self.spec.run_id.clone(),
                round: audit.round,
                peer,
                payload: audit.claim.payload,
                samples: audit.claim.samples,
                check: None,
                replay,
                outcome,
            });
        }
        if let Some(round) = verdicts.first().map(|v| v.round) {
            self.conclude(round, verdicts).await;
        }
    }

    /// Checks a closed round's updates ([`crate::checks`]) off the round's path, signs a
    /// verdict for each, records them and settles the peers' credits. Rounds are checked one
    /// at a time in the order they closed; a round whose θ and updates would take the queued
    /// rounds past [`CHECK_QUEUE_BYTES`] is not checked (its updates stay unchecked).
    pub(super) async fn check(self: Arc<Self>, job: CheckJob) {
        use std::sync::atomic::Ordering;
        let bytes = 4
            * (job.theta.len()
                + job
                    .contributions
                    .iter()
                    .map(|c| c.delta.len())
                    .sum::<usize>());
        let queued = self.checks_queued.fetch_add(bytes, Ordering::AcqRel);
        if queued > 0 && queued + bytes > CHECK_QUEUE_BYTES {
            self.checks_queued.fetch_sub(bytes, Ordering::AcqRel);
            let why = "the relay's checks were behind by more rounds than it queues";
            tracing::warn!(
                run = self.spec.run_id,
                round = job.round,
                "{why}; the round is not checked"
            );
            let checked = job.skipped(why);
            return self.settle(&job, checked).await;
        }
        let lane = self.check_lane.lock().await;
        let this = self.clone();
        let seed: u64 = rand::random();
        let started = std::time::Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            let checked = checks::check_round(&this.spec, &this.data, &this.checks, &job, seed);
            (checked, job)
        })
        .await;
        match done {
            Ok((checked, job)) => {
                tracing::info!(
                    run = self.spec.run_id,
                    round = job.round,
                    updates = checked.len(),
                    ms = started.elapsed().as_millis() as u64,
                    "checked the round's updates"
                );
                self.settle(&job, checked).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "a round's checks failed; its updates stay unchecked")
            }
        }
        drop(lane);
        self.checks_queued.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Judges a round's checks together ([`verify::judge_round`]), signs a verdict for each
    /// update, records them in the ledger and only then settles the credits in memory.
    pub(super) async fn settle(&self, job: &CheckJob, checked: Vec<(PeerKey, Checked)>) {
        let previous = self.state.lock().await.check_power;
        let scored: Vec<Option<verify::LossCheck>> = checked
            .iter()
            .filter_map(|(_, c)| match c {
                Checked::Scored(check) => Some(*check),
                Checked::Skipped(_) => None,
            })
            .collect();
        let (mut judged, power) = verify::judge_round(&self.checks, &scored, previous);
        judged.reverse();
        let mut verdicts = Vec::with_capacity(checked.len());
        for (peer, checked) in checked {
            let (check, outcome) = match checked {
                Checked::Scored(check) => (
                    check,
                    judged.pop().unwrap_or(Outcome::Inconclusive {
                        reason: "not judged".into(),
                    }),
                ),
                Checked::Skipped(reason) => (None, Outcome::Inconclusive { reason }),
            };
            let Some(claim) = job.claims.get(&peer) else {
                continue;
            };
            let verdict = Verdict {
                run_id: self.spec.run_id.clone(),
                round: job.round,
                peer,
                payload: claim.payload,
                samples: claim.samples,
                check,
                replay: None,
                outcome,
            };
            match &verdict.outcome {
                Outcome::Failed { reason } => tracing::warn!(
                    peer = peer.short(),
                    round = job.round,
                    %reason,
                    "an update failed its check: it earns no credit"
                ),
                outcome => tracing::debug!(
                    peer = peer.short(),
                    round = job.round,
                    ?outcome,
                    "checked an update"
                ),
            }
            verdicts.push(verdict);
        }
        self.conclude(job.round, verdicts).await;
        if power.is_some() {
            self.state.lock().await.check_power = power;
        }
    }

    /// Signs `round`'s verdicts, records them in the ledger and only then settles the credits
    /// in memory (a write that fails leaves them unchecked, counted as `unrecorded`).
    pub(super) async fn conclude(&self, round: u64, unsigned: Vec<Verdict>) {
        let mut verdicts = Vec::with_capacity(unsigned.len());
        for verdict in unsigned {
            match self.identity.sign(&verdict) {
                Ok(signed) => verdicts.push((verdict, signed)),
                Err(e) => tracing::error!(error = %e, "could not sign a verdict"),
            }
        }
        if let Some(store) = &self.store {
            let signed: Vec<Signed<Verdict>> = verdicts.iter().map(|(_, s)| s.clone()).collect();
            let (store, run) = (store.clone(), self.spec.run_id.clone());
            let written =
                tokio::task::spawn_blocking(move || store.record_verdicts(&run, &signed)).await;
            if let Err(e) = written.map_err(anyhow::Error::from).and_then(|r| r) {
                tracing::error!(error = %e, round, "could not record the round's verdicts; its credits stay unchecked");
                self.state
                    .lock()
                    .await
                    .check_outcomes
                    .entry("unrecorded")
                    .and_modify(|n| *n += verdicts.len() as u64)
                    .or_insert(verdicts.len() as u64);
                return;
            }
        }
        if let Some(ledger) = &self.ledger {
            for (verdict, signed) in &verdicts {
                match postcard::to_allocvec(signed) {
                    Ok(signed) => ledger.record(crate::ledger::Row::Verdict {
                        verdict: verdict.clone(),
                        signed,
                    }),
                    Err(e) => tracing::error!(error = %e, "could not encode a verdict"),
                }
            }
        }
        let mut state = self.state.lock().await;
        for (verdict, _) in &verdicts {
            *state
                .check_outcomes
                .entry(verdict.outcome.label())
                .or_default() += 1;
            state
                .credits
                .entry(verdict.peer)
                .or_default()
                .settle(&verdict.outcome, verdict.samples);
        }
        // A relay with a data directory serves verdicts from its ledger; only one without
        // keeps the newest in memory.
        if self.store.is_none() {
            state
                .verdicts
                .extend(verdicts.into_iter().map(|(v, s)| ((v.round, v.peer), s)));
            while state.verdicts.len() > RECENT_VERDICTS {
                state.verdicts.pop_first();
            }
        }
    }
}
