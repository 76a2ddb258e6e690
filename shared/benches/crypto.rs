//! What an update's signature costs (`cargo bench -p swarmtrain-shared --bench crypto`): ML-DSA-65
//! signing and verifying one envelope as a peer and the relay do, the relay's whole check of a
//! signed update (signature, then the payload's digest) for the default language model's
//! 544 KB payload, and the proof-of-work check. `verify_1000_updates` is one round of 1,000
//! peers' envelopes, verified one after another on one core.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use swarmtrain_shared::admission::{Admission, challenge, solve_proof_of_work};
use swarmtrain_shared::protocol::{ClientToRelay, Codec, Envelope, ParamsHash, PayloadRef, Update};
use swarmtrain_shared::{Identity, PeerKey};

fn update_envelope(payload: &[u8]) -> Envelope {
    Envelope {
        peer_id: vec![7; 38],
        seq: 1,
        expires_ms: u64::MAX,
        message: ClientToRelay::Update(Update {
            run_id: "lm".into(),
            round: 3,
            base: ParamsHash([1; 32]),
            n_samples: 800,
            inner_steps: 50,
            loss: 2.5,
            codec: Codec::F32,
            payload: PayloadRef::of(payload),
            state: PayloadRef::of(&[]),
        }),
    }
}

fn bench(c: &mut Criterion) {
    let id = Identity::from_seed([3; 32]);
    let payload = Codec::F32.encode(&vec![0.001; 136_000]);
    let envelope = update_envelope(&payload);
    let signed = id.sign(&envelope).expect("sign");
    let mut group = c.benchmark_group("crypto");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    group.bench_function("sign_envelope", |b| {
        b.iter(|| id.sign(black_box(&envelope)).expect("sign"))
    });
    group.bench_function("verify_envelope", |b| {
        b.iter(|| black_box(&signed).verify_and_decode().expect("verify"))
    });
    group.bench_function("check_lm_update", |b| {
        b.iter(|| {
            let (_, envelope) = black_box(&signed).verify_and_decode().expect("verify");
            let ClientToRelay::Update(update) = envelope.message else {
                unreachable!()
            };
            assert!(update.payload.matches(black_box(&payload)));
        })
    });
    let signers: Vec<_> = (0..1000u32)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..4].copy_from_slice(&i.to_le_bytes());
            Identity::from_seed(seed)
                .sign(&update_envelope(&[]))
                .expect("sign")
        })
        .collect();
    group.sample_size(10);
    group.bench_function("verify_1000_updates", |b| {
        b.iter(|| {
            for s in &signers {
                black_box(s.verify_and_decode().expect("verify"));
            }
        })
    });
    let challenge = challenge(id.public_key(), "lm", &[7; 16]);
    let peer = PeerKey([4; 32]);
    let nonce = solve_proof_of_work(&challenge, &peer, 16).expect("solvable");
    let policy = Admission::ProofOfWork { bits: 16 };
    group.sample_size(20);
    group.bench_function("check_proof_of_work", |b| {
        b.iter(|| {
            policy
                .admit(&challenge, &peer, Some(black_box(nonce)))
                .expect("admit")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
