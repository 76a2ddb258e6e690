//! `swarmtrain-peer loadtest`: many simulated peers against one running relay.

use clap::Parser;

#[derive(Parser, Debug)]
pub(crate) struct Loadtest {
    /// The relay's HTTP URL (it must run with --quorum equal to --senders). Repeated: the
    /// relays of a federation (its edges), which the peers join in turn (peer i the
    /// (i mod N)-th).
    #[arg(long, default_value = "http://127.0.0.1:8080/")]
    relay: Vec<String>,
    /// A relay whose `/metrics` are read before the first round and after the last, to report
    /// the request-response bytes it received and sent per round (a federation's root).
    #[arg(long)]
    metrics_of: Option<String>,
    /// Simulated peers kept connected.
    #[arg(long, default_value_t = 1000)]
    peers: u32,
    /// Rounds to close.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Peers that send an update each round (the relay's quorum).
    #[arg(long, default_value_t = 20)]
    senders: u32,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 60)]
    round_timeout_secs: u64,
    /// How peers learn of a new round: from the relay's gossipsub announcements (what peers
    /// do), or by long-polling it.
    #[arg(long, value_enum, default_value_t = Delivery::Gossip)]
    delivery: Delivery,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Delivery {
    Gossip,
    Poll,
}

pub(crate) async fn loadtest(args: Loadtest) -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::time::{Duration, Instant};
    use swarmtrain_client::rpc::RelayClient;
    use swarmtrain_shared::Identity;
    use swarmtrain_shared::protocol::{
        self, Capabilities, ClientToRelay, Join, PROTOCOL_VERSION, PayloadRef, RelayToClient,
        RoundAnnouncement, Update,
    };

    anyhow::ensure!(
        args.senders >= 1 && args.senders <= args.peers,
        "--senders must be in 1..=--peers"
    );
    let mut addresses: Vec<libp2p::Multiaddr> = Vec::new();
    let mut run_id = String::new();
    for relay in &args.relay {
        let boot: swarmtrain_net::Bootstrap = serde_json::from_slice(
            &swarmtrain_client::platform::http_get(&format!(
                "{}/api/bootstrap",
                relay.trim_end_matches('/')
            ))
            .await
            .map_err(anyhow::Error::msg)?,
        )?;
        addresses.push(
            boot.addresses
                .get("tcp")
                .and_then(|a| a.first())
                .context_str("the relay has no TCP address")?
                .parse()?,
        );
        run_id = boot.run_id;
    }
    let started = Instant::now();
    // Connect and join, 64 at a time.
    type Joined = (RelayClient, std::sync::Arc<Vec<u8>>, RoundAnnouncement);
    let joined: Vec<anyhow::Result<Joined>> = futures::stream::iter(0..args.peers)
        .map(|i| {
            let address = addresses[i as usize % addresses.len()].clone();
            let run_id = run_id.clone();
            async move {
                let mut seed = [7u8; 32];
                seed[..4].copy_from_slice(&i.to_le_bytes());
                let identity = Identity::from_seed(seed);
                let client = RelayClient::connect(address, &identity)?;
                let join = ClientToRelay::Join(Join {
                    version: PROTOCOL_VERSION,
                    run_id,
                    capabilities: Capabilities {
                        backend: "none".into(),
                        platform: "loadtest".into(),
                    },
                    role: swarmtrain_shared::protocol::Role::Train,
                    proof_of_work: None,
                });
                match client.send(join, Vec::new()).await? {
                    RelayToClient::Welcome(w) => {
                        if args.delivery == Delivery::Gossip {
                            client
                                .subscribe(protocol::rounds_topic(&w.spec.run_id))
                                .await?;
                        }
                        let relay_key = std::sync::Arc::new(w.relay_key().to_vec());
                        let round = w.round.verify_with_key(&relay_key)?;
                        Ok((client, relay_key, round))
                    }
                    other => anyhow::bail!("expected a welcome, got {other:?}"),
                }
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let peers: Vec<_> = joined.into_iter().collect::<anyhow::Result<_>>()?;
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!("{} peers joined in {connect_s:.1} s", peers.len());

    // Let the last subscriptions reach the relay.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every peer waits for the next round (gossip or long poll) and reports when it sees it.
    let (seen_tx, mut seen_rx) = futures::channel::mpsc::channel::<(u64, Instant)>(4096);
    let first_round = peers.iter().map(|p| p.2.round).max().unwrap_or(0);
    let last_round = first_round + u64::from(args.rounds);
    for (client, relay_key, round) in &peers {
        let (client, relay_key, run_id, mut seen) = (
            client.clone(),
            relay_key.clone(),
            run_id.clone(),
            seen_tx.clone(),
        );
        let mut current = round.round;
        tokio::spawn(async move {
            while current < last_round && args.delivery == Delivery::Gossip {
                let Some(gossiped) = client.next_gossip().await else {
                    return;
                };
                if let Ok(r) = protocol::verify_gossiped(&gossiped.data, &relay_key)
                    && r.round > current
                {
                    current = r.round;
                    let _ = futures::SinkExt::send(&mut seen, (current, Instant::now())).await;
                }
            }
            while current < last_round {
                let ask = ClientToRelay::AwaitRound {
                    run_id: run_id.clone(),
                    after: Some(current),
                };
                match client.send(ask, Vec::new()).await {
                    Ok(RelayToClient::Round(r)) => match r.verify_with_key(&relay_key) {
                        Ok(r) if r.round > current => {
                            current = r.round;
                            let _ =
                                futures::SinkExt::send(&mut seen, (current, Instant::now())).await;
                        }
                        _ => {}
                    },
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    drop(seen_tx);

    let rpc_bytes_before = match &args.metrics_of {
        Some(url) => Some(rpc_bytes(url).await?),
        None => None,
    };
    let mut latencies_ms = Vec::new();
    let mut completed = 0u32;
    let mut announcement = peers[0].2.clone();
    for _ in 0..args.rounds {
        // Quorum − 1 updates, then the one that closes the round: its send time is the close.
        let payload =
            swarmtrain_shared::protocol::Codec::F32
                .encode(&vec![1e-4; announcement.n_params as usize]);
        let update = |r: &RoundAnnouncement| {
            ClientToRelay::Update(Update {
                run_id: run_id.clone(),
                round: r.round,
                base: r.params,
                n_samples: 1,
                inner_steps: 1,
                loss: 1.0,
                codec: swarmtrain_shared::protocol::Codec::F32,
                payload: PayloadRef::of(&payload),
                state: PayloadRef::of(&[]),
            })
        };
        let senders = &peers[..args.senders as usize];
        for (client, _, _) in &senders[..senders.len() - 1] {
            let answer = client.send(update(&announcement), payload.clone()).await?;
            anyhow::ensure!(
                matches!(answer, RelayToClient::Accepted { .. }),
                "update refused: {answer:?}"
            );
        }
        let (client, relay_key, _) = &senders[senders.len() - 1];
        let closing = update(&announcement);
        let closed_at = Instant::now();
        let answer = client.send(closing, payload.clone()).await?;
        anyhow::ensure!(
            matches!(answer, RelayToClient::Accepted { .. }),
            "update refused: {answer:?}"
        );
        let next = announcement.round + 1;
        let deadline = closed_at + Duration::from_secs(args.round_timeout_secs);
        let mut received = 0;
        while received < peers.len() {
            let Ok(Some((round, at))) =
                tokio::time::timeout_at(deadline.into(), seen_rx.next()).await
            else {
                break;
            };
            if round == next {
                received += 1;
                latencies_ms.push(at.saturating_duration_since(closed_at).as_secs_f64() * 1e3);
            }
        }
        eprintln!(
            "round {} closed; {received} of {} peers saw round {next}",
            announcement.round,
            peers.len()
        );
        if received < peers.len() {
            anyhow::bail!(
                "only {received} of {} peers saw round {next} within {} s",
                peers.len(),
                args.round_timeout_secs
            );
        }
        completed += 1;
        let ask = ClientToRelay::AwaitRound {
            run_id: run_id.clone(),
            after: None,
        };
        announcement = match client.send(ask, Vec::new()).await? {
            RelayToClient::Round(r) => r.verify_with_key(relay_key)?,
            other => anyhow::bail!("expected the round, got {other:?}"),
        };
    }
    let rpc_bytes_per_round = match (&args.metrics_of, rpc_bytes_before) {
        (Some(url), Some(before)) if completed > 0 => {
            let after = rpc_bytes(url).await?;
            Some((after - before) as f64 / f64::from(completed))
        }
        _ => None,
    };
    latencies_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies_ms
            .get(((latencies_ms.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "{}",
        serde_json::json!({
            "peers": peers.len(),
            "delivery": format!("{:?}", args.delivery).to_lowercase(),
            "rounds_completed": completed,
            "connect_seconds": connect_s,
            "latency_ms_p50": pct(0.5),
            "latency_ms_p99": pct(0.99),
            "latency_ms_max": latencies_ms.last().copied().unwrap_or(f64::NAN),
            "announcements_received": latencies_ms.len(),
            "relays": addresses.len(),
            "metrics_rpc_bytes_per_round": rpc_bytes_per_round,
        })
    );
    Ok(())
}

/// The request-response bytes (received and sent) that the relay at `url` reports in its
/// `/metrics`.
async fn rpc_bytes(url: &str) -> anyhow::Result<u64> {
    let text =
        swarmtrain_client::platform::http_get(&format!("{}/metrics", url.trim_end_matches('/')))
            .await
            .map_err(anyhow::Error::msg)?;
    let text = String::from_utf8_lossy(&text);
    let value = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .context_str(&format!("no {name} in the relay's metrics"))
    };
    Ok(value("swarmtrain_rpc_received_bytes_total ")? + value("swarmtrain_rpc_sent_bytes_total ")?)
}

/// `Option::context` for a message without pulling `anyhow::Context` into every function.
trait ContextStr<T> {
    fn context_str(self, message: &str) -> anyhow::Result<T>;
}

impl<T> ContextStr<T> for Option<T> {
    fn context_str(self, message: &str) -> anyhow::Result<T> {
        self.ok_or_else(|| anyhow::anyhow!("{message}"))
    }
}
