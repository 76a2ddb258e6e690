//! Bad input from the network: a forged signature, a truncated message, a wrong round, a
//! wrong-shaped update, non-finite values, a payload that is not the signed one, a replayed
//! message, one signed for another connection, an expired one, an update without a join, parts
//! of a long message out of order, forged or from a connection that never signed anything, an
//! oversized frame, a long poll for a future round and more requests in flight than one
//! connection may have are each refused with a reason (or answered at once), counted, and the
//! run goes on.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use swarmtrain_client::rpc::RelayClient;
use swarmtrain_relay::digits_run;
use swarmtrain_relay::p2p::MAX_IN_FLIGHT_PER_PEER;
use swarmtrain_shared::Identity;
use swarmtrain_shared::protocol::{
    self, ClientToRelay, Codec, MAX_FRAME_BYTES, Part, PayloadRef, RelayToClient, Request,
    Submission, Update,
};
use swarmtrain_tests::{init_logging, join_raw, metrics, sign, spawn_peer, start_relay};

fn rejection(answer: RelayToClient) -> String {
    match answer {
        RelayToClient::Rejected { reason, .. } => reason,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// `message` in a fresh envelope of `client`'s connection, signed by `identity`.
/// An update to round `round` of the digits run, trained from `base`, with `payload` (f32): one
/// step of 32 samples.
fn digits_update(
    base: swarmtrain_shared::protocol::ParamsHash,
    round: u64,
    payload: &[u8],
) -> ClientToRelay {
    ClientToRelay::Update(Update {
        run_id: "digits".into(),
        round,
        base,
        n_samples: 32,
        inner_steps: 1,
        loss: 1.0,
        codec: Codec::F32,
        payload: PayloadRef::of(payload),
        state: PayloadRef::of(&[]),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_rejected_and_the_run_goes_on() {
    init_logging();
    let mut run = digits_run();
    run.quorum = 1;
    run.inner.steps = 20;
    let relay = start_relay(run).await;
    let (client, attacker, _, announcement) = join_raw(&relay, [99; 32]).await;
    let n = announcement.n_params as usize;
    let unsigned = |round: u64, payload: &[u8]| digits_update(announcement.params, round, payload);
    let update = |round: u64, values: Vec<f32>| {
        let payload = protocol::params_to_bytes(&values);
        sign(&client, &attacker, unsigned(round, &payload), payload)
    };

    // A forged signature: the body was changed after signing.
    let mut forged = update(0, vec![1e-3; n]);
    let last = forged.signed.body.len() - 1;
    forged.signed.body[last] ^= 1;
    let reason = rejection(client.submit(&forged).await.expect("answer"));
    assert!(reason.contains("signature"), "{reason}");

    // A payload other than the one the update signed.
    let mut swapped = update(0, vec![1e-3; n]);
    swapped.payload[0] ^= 1;
    let reason = rejection(client.submit(&swapped).await.expect("answer"));
    assert!(reason.contains("digest"), "{reason}");

    // A message signed for another connection, and one that has expired.
    let (other_client, _, _, _) = join_raw(&relay, [97; 32]).await;
    let elsewhere = sign(
        &other_client,
        &attacker,
        ClientToRelay::AwaitRound {
            run_id: "digits".into(),
            after: None,
        },
        Vec::new(),
    );
    let reason = rejection(client.submit(&elsewhere).await.expect("answer"));
    assert!(reason.contains("signed for connection"), "{reason}");
    let mut stale = client.envelope(ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: None,
    });
    stale.expires_ms = swarmtrain_relay::runs::unix_ms() - 1;
    let stale = Submission {
        signed: attacker.sign(&stale).expect("sign"),
        payload: Vec::new(),
    };
    let reason = rejection(client.submit(&stale).await.expect("answer"));
    assert!(reason.contains("expired"), "{reason}");

    // An update from an identity that never joined, and the parts of a long message from a
    // connection that has not signed anything yet.
    let stranger = Identity::from_seed([96; 32]);
    let unjoined = RelayClient::connect(
        relay.bootstrap.addresses["tcp"][0]
            .parse()
            .expect("multiaddr"),
        &stranger,
    )
    .expect("dial");
    let reason = rejection(
        protocol::decode(
            &unjoined
                .request_frame(
                    protocol::requests_for(&update(0, vec![1e-3; n])).expect("split")[0].clone(),
                )
                .await
                .expect("answer"),
        )
        .expect("decodes"),
    );
    assert!(reason.contains("before sending a long message"), "{reason}");
    let payload = Codec::F32.encode(&[1e-3; 8]);
    let small = unsigned(0, &payload);
    let reason = rejection(unjoined.send(small, payload).await.expect("answer"));
    assert!(reason.contains("Join"), "{reason}");

    // A truncated message.
    let ask = ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: None,
    };
    let frame = protocol::encode(&Request::Submit(sign(&client, &attacker, ask, Vec::new())))
        .expect("encode");
    let answer = client
        .request_frame(frame[..frame.len() / 2].to_vec())
        .await
        .expect("answer");
    let reason = rejection(protocol::decode(&answer).expect("decodes"));
    assert!(reason.contains("malformed"), "{reason}");

    // A long poll for a round after one that does not exist yet is answered at once with the
    // current round instead of leaving a waiter that no announcement would ever release.
    let ask = ClientToRelay::AwaitRound {
        run_id: "digits".into(),
        after: Some(u64::MAX),
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), client.send(ask, Vec::new()))
        .await
        .expect("answered without waiting for the long poll's timeout")
        .expect("answer");
    let RelayToClient::Round(current) = answer else {
        panic!("a round announcement, got {answer:?}")
    };
    let (_, current) = current.verify_and_decode().expect("signed by the relay");
    assert_eq!(current.round, 0);

    // An update too long for one frame travels in parts; parts that skip ahead, or whose whole
    // does not match its digest, are refused.
    let frames = protocol::requests_for(&update(0, vec![1e-3; n])).expect("split");
    assert!(
        frames.len() >= 2,
        "the digits update needs {} frames",
        frames.len()
    );
    let Request::Part(first) = protocol::decode::<Request>(&frames[0]).expect("part") else {
        panic!("a part")
    };
    let skipped = Part {
        offset: first.offset + 2 * first.bytes.len() as u32,
        ..first.clone()
    };
    let reason = rejection(
        protocol::decode(
            &client
                .request_frame(protocol::encode(&Request::Part(skipped)).expect("encode"))
                .await
                .expect("answer"),
        )
        .expect("decodes"),
    );
    assert!(reason.contains("does not continue"), "{reason}");
    let mut tampered: Vec<Part> = frames
        .iter()
        .map(|f| match protocol::decode::<Request>(f).expect("part") {
            Request::Part(p) => p,
            _ => panic!("a part"),
        })
        .collect();
    tampered.last_mut().expect("parts").bytes[0] ^= 1;
    let mut last = None;
    for part in tampered {
        last = Some(
            protocol::decode(
                &client
                    .request_frame(protocol::encode(&Request::Part(part)).expect("encode"))
                    .await
                    .expect("answer"),
            )
            .expect("decodes"),
        );
    }
    let reason = rejection(last.expect("answered"));
    assert!(reason.contains("digest"), "{reason}");

    // A wrong round number.
    let reason = rejection(
        client
            .submit(&update(5, vec![1e-3; n]))
            .await
            .expect("answer"),
    );
    assert!(reason.contains("round 5"), "{reason}");

    // A wrong-shaped update.
    let reason = rejection(
        client
            .submit(&update(0, vec![1e-3; n - 3]))
            .await
            .expect("answer"),
    );
    assert!(
        reason.contains(&format!("{} bytes, {} expected", 4 * (n - 3), 4 * n)),
        "{reason}"
    );

    // NaN and infinity.
    let mut poisoned = vec![1e-3; n];
    poisoned[7] = f32::NAN;
    poisoned[8] = f32::INFINITY;
    let reason = rejection(client.submit(&update(0, poisoned)).await.expect("answer"));
    assert!(reason.contains("NaN"), "{reason}");

    // A frame over the size limit is refused before it is buffered; the connection survives.
    assert!(
        client
            .request_frame(vec![0; MAX_FRAME_BYTES + 1])
            .await
            .is_err()
    );

    // A valid update is accepted (and closes round 0: quorum 1); replaying it is refused.
    let valid = update(0, vec![1e-3; n]);
    assert!(matches!(
        client.submit(&valid).await.expect("answer"),
        RelayToClient::Accepted { round: 0 }
    ));
    // The round closes on the relay's timer just after `Accepted`: wait for round 1.
    let ask = ClientToRelay::AwaitRound {
        run_id: relay.bootstrap.run_id.clone(),
        after: Some(0),
    };
    assert!(matches!(
        client.send(ask, Vec::new()).await.expect("answer"),
        RelayToClient::Round(_)
    ));
    let reason = rejection(client.submit(&valid).await.expect("answer"));
    assert!(reason.contains("already received"), "{reason}");

    let status = relay.coordinator.status().await;
    for kind in [
        "bad_signature",
        "malformed",
        "bad_part",
        "wrong_round",
        "wrong_shape",
        "non_finite",
        "payload_mismatch",
        "wrong_connection",
        "expired",
        "replayed",
        "not_joined",
        "unbound_part",
    ] {
        assert!(
            status.rejected.get(kind).copied().unwrap_or(0) >= 1,
            "{kind} counted: {:?}",
            status.rejected
        );
    }
    assert_eq!(status.rejected["wrong_round"], 1, "the wrong round");

    // One identity parks one long poll: each newer one replaces the one before, which is
    // refused at once with a reason (`poll_busy`) and counted, and none stops the honest peer
    // below.
    let (flooder, _, _, _) = join_raw(&relay, [98; 32]).await;
    let after = Some(relay.coordinator.status().await.round);
    let mut polls: FuturesUnordered<_> = (0..=MAX_IN_FLIGHT_PER_PEER)
        .map(|_| {
            let poll = ClientToRelay::AwaitRound {
                run_id: "digits".into(),
                after,
            };
            flooder.send(poll, Vec::new())
        })
        .collect();
    let first = tokio::time::timeout(Duration::from_secs(10), polls.next())
        .await
        .expect("refused at once, not parked")
        .expect("an answer")
        .expect("answer");
    let reason = rejection(first);
    assert!(reason.contains("replaced"), "{reason}");
    assert!(relay.coordinator.status().await.rejected["poll_busy"] >= 1);

    // The run goes on: an honest peer trains three rounds and accuracy rises.
    let honest = spawn_peer(&relay, 1, 3);
    let (trained, _) = tokio::time::timeout(Duration::from_secs(300), honest.finish())
        .await
        .expect("in time");
    assert_eq!(trained, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = relay.coordinator.status().await;
    assert!(status.round >= 4, "rounds advanced: {}", status.round);
    let accuracy: Vec<f32> = status.history.iter().filter_map(|r| r.accuracy).collect();
    assert!(
        accuracy.last() > accuracy.first(),
        "accuracy rose: {accuracy:?}"
    );
    relay.shutdown().await;
}

/// The hybrid ML-KEM-768 + X25519 session: a peer that agreed keys has its update payload
/// opened and accepted and gets θ chunks sealed (the bytes on the wire are not θ, the opened
/// ones are); a plaintext payload on a sealed connection, a key offer before a join, a confirm
/// of another transcript and an accept signed by another key are refused, each with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_sessions_carry_updates_and_chunks_and_refuse_the_rest() {
    use swarmtrain_shared::seal::{self, Offerer};
    init_logging();
    let mut run = digits_run();
    run.quorum = 2;
    let relay = start_relay(run).await;
    let (client, _, welcome, announcement) = join_raw(&relay, [90; 32]).await;
    let n = announcement.n_params as usize;

    // An accept is checked against the relay key the peer holds: a wrong one fails the exchange
    // (and nothing is sealed), the right one agrees keys.
    let wrong = Identity::from_seed([1; 32]);
    let error = client.agree_keys(wrong.public_key()).await.unwrap_err();
    assert!(error.to_string().contains("signed"), "{error}");
    assert!(client.keys().is_none());
    client.agree_keys(welcome.relay_key()).await.expect("keys");
    let keys = client.keys().expect("agreed");

    // θ arrives sealed, and opens to the announced parameters.
    let fetch = Request::Fetch(protocol::Fetch::Params {
        run_id: "digits".into(),
        hash: announcement.params,
        offset: 0,
    });
    let raw: RelayToClient = protocol::decode(
        &client
            .request_frame(protocol::encode(&fetch).unwrap())
            .await
            .unwrap(),
    )
    .unwrap();
    let RelayToClient::Chunk { total, bytes, .. } = raw else {
        panic!("expected a chunk, got {raw:?}");
    };
    let theta = client
        .fetch_params("digits", announcement.params)
        .await
        .expect("θ");
    assert_eq!(total as usize, theta.len());
    let plain = &theta[..protocol::CHUNK_BYTES.min(theta.len())];
    assert_eq!(bytes.len(), plain.len() + seal::SEAL_OVERHEAD);
    assert!(
        !bytes.windows(64).any(|w| w == &plain[..64]),
        "θ travelled in clear"
    );
    let opened = keys
        .open(
            &seal::chunk_context(&announcement.params.0, 0, total),
            &bytes,
        )
        .expect("opens");
    assert_eq!(opened, plain);

    // A sealed update is opened and accepted; a plaintext one on this connection is refused.
    let update = |payload: &[u8]| digits_update(announcement.params, announcement.round, payload);
    let payload = Codec::F32.encode(&vec![1e-3; n]);
    let answer = client
        .send(update(&payload), payload.clone())
        .await
        .unwrap();
    assert!(
        matches!(answer, RelayToClient::Accepted { .. }),
        "{answer:?}"
    );
    let (other, other_identity, other_welcome, _) = join_raw(&relay, [91; 32]).await;
    other
        .agree_keys(other_welcome.relay_key())
        .await
        .expect("keys");
    let plaintext = sign(&other, &other_identity, update(&payload), payload.clone());
    let reason = rejection(other.submit(&plaintext).await.unwrap());
    assert!(reason.contains("sealed payload"), "{reason}");

    // A confirm of a transcript the relay never made.
    let confirm = ClientToRelay::KeyConfirm {
        transcript: [7; 32],
    };
    let reason = rejection(other.send(confirm, Vec::new()).await.unwrap());
    assert!(reason.contains("transcript"), "{reason}");

    // A key offer from a connection that has not joined.
    let stranger = Identity::from_seed([92; 32]);
    let unjoined = RelayClient::connect(
        relay.bootstrap.addresses["tcp"][0].parse().unwrap(),
        &stranger,
    )
    .unwrap();
    let (_, offer) = Offerer::new().unwrap();
    let reason = rejection(
        unjoined
            .send(ClientToRelay::KeyOffer(offer), Vec::new())
            .await
            .unwrap(),
    );
    assert!(reason.contains("join"), "{reason}");

    let status = relay.coordinator.status().await;
    for kind in ["undecryptable", "unknown_session", "not_joined"] {
        assert_eq!(
            status.rejected.get(kind),
            Some(&1),
            "{kind}: {:?}",
            status.rejected
        );
    }
    let metrics = metrics(&relay).await;
    assert!(
        metrics.contains("swarmtrain_sealed_connections 2"),
        "{metrics}"
    );
    relay.shutdown().await;
}

/// A relay that requires sealing refuses θ and updates to a connection without session keys,
/// with the reason, and serves the same connection once it agrees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_requires_sealing_refuses_plaintext() {
    init_logging();
    let mut run = digits_run();
    run.quorum = 2;
    let relay = swarmtrain_relay::Relay::start(swarmtrain_relay::RelayConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        web_dir: swarmtrain_tests::package_path("../web"),
        runs: vec![run],
        require_sealed: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let (client, _, welcome, announcement) = join_raw(&relay, [93; 32]).await;
    let error = client
        .fetch_params("digits", announcement.params)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("sealed"), "{error}");
    let payload = Codec::F32.encode(&vec![1e-3; announcement.n_params as usize]);
    let update = digits_update(announcement.params, announcement.round, &payload);
    let reason = rejection(client.send(update.clone(), payload.clone()).await.unwrap());
    assert!(reason.contains("sealed"), "{reason}");
    assert_eq!(
        relay.coordinator.status().await.rejected.get("not_sealed"),
        Some(&2)
    );

    client.agree_keys(welcome.relay_key()).await.expect("keys");
    let theta = client
        .fetch_params("digits", announcement.params)
        .await
        .expect("θ once sealed");
    assert_eq!(theta.len(), 4 * announcement.n_params as usize);
    let answer = client.send(update, payload).await.unwrap();
    assert!(
        matches!(answer, RelayToClient::Accepted { .. }),
        "{answer:?}"
    );
    relay.shutdown().await;
}

/// Session keys belong to a connection: two tabs sharing a seed (one identity, one peer ID,
/// two connections) each agree their own keys, and each keeps fetching sealed θ and having its
/// sealed updates opened; before, the second agreement replaced the first tab's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_connections_of_one_identity_keep_their_own_session_keys() {
    init_logging();
    let mut run = digits_run();
    run.quorum = 3;
    let relay = start_relay(run).await;
    let (first, _, welcome, announcement) = join_raw(&relay, [91; 32]).await;
    first.agree_keys(welcome.relay_key()).await.expect("keys");
    let (second, _, _, _) = join_raw(&relay, [91; 32]).await;
    second.agree_keys(welcome.relay_key()).await.expect("keys");
    assert_eq!(
        first.peer_id(),
        second.peer_id(),
        "one peer ID, two connections"
    );
    for client in [&first, &second] {
        let theta = client
            .fetch_params("digits", announcement.params)
            .await
            .expect("θ opens with this connection's keys");
        assert_eq!(protocol::ParamsHash::of(&theta), announcement.params);
    }
    // The first tab's sealed update is opened with its own keys.
    let n = announcement.n_params as usize;
    let payload = Codec::F32.encode(&vec![1e-3; n]);
    let update = digits_update(announcement.params, announcement.round, &payload);
    let answer = first.send(update, payload).await.expect("answer");
    assert!(
        matches!(answer, RelayToClient::Accepted { .. }),
        "{answer:?}"
    );
    relay.shutdown().await;
}
