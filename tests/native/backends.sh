#!/bin/bash
# By hand (it needs a swarmtrain-peer built with the wgpu feature, and Mesa's lavapipe or a GPU):
# a relay process, one native trainer on ndarray, one on wgpu and one volunteer verifier, all
# from the command line, on a tiny LM with every update drawn for a replay. Prints the relay's
# status (peers by backend, replays, verifiers' reports) and each trainer's rounds and verdicts.
#
#   cargo build -p swarmtrain-relay --bin swarmtrain-relay
#   cargo build -p swarmtrain-client --bin swarmtrain-peer --features wgpu
#   RELAY=target/debug/swarmtrain-relay PEER=target/debug/swarmtrain-peer tests/native/backends.sh
set -u
RELAY=${RELAY:-target/debug/swarmtrain-relay}
PEER=${PEER:-target/debug/swarmtrain-peer}
PORT=${PORT:-18080}
URL=http://127.0.0.1:$PORT/
D=$(mktemp -d)
"$RELAY" serve --http 127.0.0.1:$PORT --data-dir "$D/data" --context 32 --d-model 32 --heads 2 \
  --layers 1 --inner-steps 10 --batch-size 8 --quorum 2 --round-deadline-secs 300 \
  --replay-fraction 1 > "$D/relay.log" 2>&1 &
RP=$!
VP=
trap 'kill $RP $VP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 60); do curl -sf "${URL}healthz" > /dev/null && break; sleep 1; done
export RUST_LOG=swarmtrain_client=info,swarmtrain_peer=info
"$PEER" verify --relay "$URL" --key-file "$D/verifier.key" > "$D/verifier.log" 2>&1 &
VP=$!
sleep 2
"$PEER" train --relay "$URL" --rounds 4 --key-file "$D/ndarray.key" > "$D/ndarray.log" 2>&1 &
C=$!
timeout 900 "$PEER" train --backend wgpu --relay "$URL" --rounds 4 --key-file "$D/wgpu.key" \
  > "$D/wgpu.log" 2>&1 &
W=$!
wait $C; echo "ndarray peer: exit $?"
wait $W; echo "wgpu peer: exit $?"
sleep 15  # the last round's replays
status='import json, sys
s = json.load(sys.stdin)
s = s[0] if isinstance(s, list) else s
print({k: s.get(k) for k in ["round", "joined_peers", "backends", "replays", "verifiers", "verifier_reports", "checks"]})'
curl -s "${URL}api/status" | python3 -c "$status"
credit='import json, sys
c = json.load(sys.stdin)
print("  verified", c["verified_updates"], "failed", c["failed_updates"], [(v["round"], v.get("replay")) for v in c["verdicts"]])'
for k in ndarray wgpu; do
  log=$(sed 's/\x1b\[[0-9;]*m//g' "$D/$k.log")
  peer=$(grep -o 'peer: "[0-9a-f]\{64\}"' <<< "$log" | head -1 | cut -d'"' -f2)
  echo "$k peer $peer:"
  grep -o 'Trained {[^}]*}' <<< "$log"
  curl -s "${URL}api/runs/lm/peers/$peer" | python3 -c "$credit"
done
