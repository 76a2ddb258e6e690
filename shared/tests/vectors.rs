//! Known-answer vectors for the wire format and the derivations peers and relays must agree
//! on. Each case's bytes are kept as hex in `tests/vectors/<name>.hex`; any change to an
//! encoding (a field added, reordered or retyped, a codec's layout, a key derivation, ML-DSA's
//! deterministic signing) fails here. After a deliberate change (with a protocol version bump),
//! rewrite them with `SWARMTRAIN_UPDATE_VECTORS=1 cargo test -p swarmtrain-shared --test vectors`.

use std::path::PathBuf;

use swarmtrain_shared::admission::{challenge, proof_of_work_digest};
use swarmtrain_shared::compress::Codec;
use swarmtrain_shared::lm_train::{Moments, TrainerState};
use swarmtrain_shared::protocol::{
    Capabilities, ClientToRelay, Envelope, Fetch, Join, ParamsHash, Part, PayloadRef,
    RelayToClient, ReplayJob, Replayed, Request, Reveal, Role, RoundAnnouncement, Submission,
    Update, encode,
};
use swarmtrain_shared::replay::CommittedState;
use swarmtrain_shared::seal::{self, Offerer};
use swarmtrain_shared::{Identity, PeerKey};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check(name: &str, bytes: &[u8]) {
    // The test process's CARGO_MANIFEST_DIR names this checkout even when the binary was built
    // from another one sharing the target directory.
    let path = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .join("tests/vectors")
        .join(format!("{name}.hex"));
    let got = hex(bytes);
    if std::env::var_os("SWARMTRAIN_UPDATE_VECTORS").is_some() {
        std::fs::write(&path, format!("{got}\n")).expect("write vector");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (write it with SWARMTRAIN_UPDATE_VECTORS=1)",
            path.display()
        )
    });
    assert_eq!(got, want.trim(), "{name}: the encoding changed");
}

fn envelope(message: ClientToRelay) -> Envelope {
    Envelope {
        peer_id: (0..38).collect(),
        seq: 1_764_000_000_000_000,
        expires_ms: 1_764_000_600_000,
        message,
    }
}

#[test]
fn wire_messages_keep_their_encoding() {
    let id = Identity::from_seed([1; 32]);
    let payload = Codec::F32.encode(&[0.5, -0.25, 1.0]);
    // A replica's state after one step of a one-tensor model, with its residual.
    let committed = CommittedState {
        trainer: TrainerState {
            step: 350,
            moments: vec![Moments {
                time: 1,
                first: vec![0.125, -0.5, 0.0],
                second: vec![0.015625, 0.25, 0.0],
            }],
        },
        residual: vec![0.0, 0.001, -0.002],
    }
    .to_bytes();
    check("committed_state", &committed);
    let join = envelope(ClientToRelay::Join(Join {
        version: 4,
        run_id: "lm".into(),
        capabilities: Capabilities {
            backend: "wgpu".into(),
            platform: "test".into(),
        },
        role: Role::Verify,
        proof_of_work: Some(12_345),
    }));
    let update = envelope(ClientToRelay::Update(Update {
        run_id: "lm".into(),
        round: 7,
        base: ParamsHash([9; 32]),
        n_samples: 800,
        inner_steps: 50,
        loss: 2.5,
        codec: Codec::F32,
        payload: PayloadRef::of(&payload),
        state: PayloadRef::of(&committed),
    }));
    let reveal = envelope(ClientToRelay::Reveal(Reveal {
        run_id: "lm".into(),
        round: 7,
        state: PayloadRef::of(&committed),
    }));
    let verify = envelope(ClientToRelay::Verify {
        run_id: "lm".into(),
    });
    let replayed = envelope(ClientToRelay::Replayed(Replayed {
        run_id: "lm".into(),
        job: 3,
        update: Some(PayloadRef::of(&payload)),
    }));
    check(
        "envelope_verify",
        &postcard::to_allocvec(&verify).expect("encode"),
    );
    check(
        "envelope_replayed",
        &postcard::to_allocvec(&replayed).expect("encode"),
    );
    let poll = envelope(ClientToRelay::AwaitRound {
        run_id: "lm".into(),
        after: Some(6),
    });
    check(
        "envelope_join",
        &postcard::to_allocvec(&join).expect("encode"),
    );
    check(
        "envelope_update",
        &postcard::to_allocvec(&update).expect("encode"),
    );
    check(
        "envelope_reveal",
        &postcard::to_allocvec(&reveal).expect("encode"),
    );
    check(
        "envelope_await_round",
        &postcard::to_allocvec(&poll).expect("encode"),
    );
    // ML-DSA-65 signing is deterministic here (no randomness): the signed frame is fixed too.
    let submit = Request::Submit(Submission {
        signed: id.sign(&update).expect("sign"),
        payload: payload.clone(),
    });
    check("request_submit_update", &encode(&submit).expect("encode"));
    check(
        "request_part",
        &encode(&Request::Part(Part {
            digest: [3; 32],
            total: 20_000,
            offset: 7_168,
            bytes: vec![1, 2, 3],
        }))
        .expect("encode"),
    );
    check(
        "request_fetch",
        &encode(&Request::Fetch(Fetch::Params {
            run_id: "lm".into(),
            hash: ParamsHash([4; 32]),
            offset: 14_336,
        }))
        .expect("encode"),
    );
    check(
        "request_fetch_state",
        &encode(&Request::Fetch(Fetch::State {
            run_id: "lm".into(),
            digest: [7; 32],
            offset: 7_168,
        }))
        .expect("encode"),
    );
    for (name, answer) in [
        (
            "answer_job",
            RelayToClient::Job(Some(ReplayJob {
                job: 3,
                round: 7,
                theta: ParamsHash([4; 32]),
                slot: 2,
                steps: 50,
                state: PayloadRef::of(&committed),
            })),
        ),
        ("answer_no_job", RelayToClient::Job(None)),
        ("answer_accepted", RelayToClient::Accepted { round: 7 }),
        ("answer_revealed", RelayToClient::Revealed { round: 7 }),
        (
            "answer_rejected",
            RelayToClient::Rejected {
                kind: "replayed".into(),
                reason: "message 5 was already received".into(),
            },
        ),
        (
            "answer_chunk",
            RelayToClient::Chunk {
                total: 8,
                offset: 4,
                bytes: vec![0, 0, 128, 63],
            },
        ),
    ] {
        check(name, &encode(&answer).expect("encode"));
    }
    let announcement = RoundAnnouncement {
        run_id: "lm".into(),
        round: 8,
        params: ParamsHash([5; 32]),
        n_params: 136_000,
        deadline_ms: 60_000,
        accuracy: None,
        loss: Some(3.25),
        audit: vec![PeerKey([6; 32])],
    };
    check(
        "announcement",
        &postcard::to_allocvec(&announcement).expect("encode"),
    );
}

#[test]
fn codecs_keep_their_layout() {
    let values: Vec<f32> = (0..40).map(|i| (i as f32 - 17.5) / 8.0).collect();
    for (name, codec) in [
        ("codec_f32", Codec::F32),
        ("codec_f16", Codec::F16),
        ("codec_int8", Codec::Int8Block { block: 16 }),
        (
            "codec_topk",
            Codec::TopK {
                per_million: 250_000,
            },
        ),
        (
            "codec_topk2",
            Codec::TopKQuant {
                per_million: 250_000,
                bits: 2,
            },
        ),
        ("codec_int4", Codec::LowBitBlock { block: 16, bits: 4 }),
    ] {
        check(name, &codec.encode(&values));
    }
}

#[test]
fn derivations_keep_their_values() {
    let id = Identity::from_seed([1; 32]);
    check("peer_key", &id.peer().0);
    check("network_secret", id.network_secret().as_slice());
    let challenge = challenge(id.public_key(), "lm", &[7; 16]);
    check("admission_challenge", &challenge);
    check(
        "proof_of_work_digest",
        &proof_of_work_digest(&challenge, &PeerKey([2; 32]), 99),
    );
}

/// The hybrid key exchange with fixed randomness: the signed offer, the relay's signed accept,
/// the transcript hash and a sealed payload and chunk (each side's first message).
#[test]
fn key_exchange_and_sealing_keep_their_encoding() {
    let peer = Identity::from_seed([1; 32]);
    let relay = Identity::from_seed([2; 32]);
    let (offerer, offer) = Offerer::from_randomness(&[3; 64], &[4; 32]);
    let signed_offer = peer
        .sign(&envelope(ClientToRelay::KeyOffer(offer.clone())))
        .expect("sign");
    let digest = seal::digest_signed(&signed_offer);
    let (accept, relay_keys) =
        seal::accept_with(&relay, digest, &offer, &[5; 32], &[6; 32]).expect("accept");
    let peer_keys = offerer
        .finish(&digest, relay.public_key(), &accept)
        .expect("finish");
    assert_eq!(peer_keys.transcript(), relay_keys.transcript());
    check(
        "key_offer",
        &encode(&Request::Submit(Submission {
            signed: signed_offer,
            payload: Vec::new(),
        }))
        .expect("encode"),
    );
    check(
        "key_accept",
        &encode(&RelayToClient::KeyAccept(accept)).expect("encode"),
    );
    check("key_transcript", &peer_keys.transcript());
    let payload = seal::payload_context(7);
    check("sealed_payload", &peer_keys.seal(&payload, b"delta"));
    let chunk = seal::chunk_context(&[9; 32], 0, 5);
    check("sealed_chunk", &relay_keys.seal(&chunk, b"theta"));
}
