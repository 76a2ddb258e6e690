//! Every frame decoder a peer or the relay runs on bytes from the network: requests, answers
//! and gossiped announcements, and the committed training state a peer reveals for a replay.
//! None may panic; a decoded submission goes through the signature check as the relay would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use swarmtrain_shared::protocol::{self, Envelope, RelayToClient, Request, RoundAnnouncement};
use swarmtrain_shared::replay::CommittedState;
use swarmtrain_shared::{PeerKey, Signed};

fuzz_target!(|data: &[u8]| {
    if let Ok(Request::Submit(submission)) = protocol::decode::<Request>(data) {
        let _ = submission.signed.verify_and_decode();
    }
    let _ = protocol::decode::<RelayToClient>(data);
    let _ = protocol::decode::<Signed<Envelope>>(data);
    let _ = protocol::decode::<Signed<RoundAnnouncement>>(data);
    let _ = protocol::verify_gossiped(data, &[0; swarmtrain_shared::crypto::PUBLIC_KEY_BYTES]);
    let _ = PeerKey::from_public_key(data);
    let _ = CommittedState::from_bytes(data);
});
