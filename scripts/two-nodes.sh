#!/bin/bash
# Two `pipeline serve` nodes on one NATS JetStream and one PostgreSQL store (services and
# history), a loadgen against each (fleets 233 km apart, so each flies its own orders); node
# A SIGKILLed and restarted KILLS (default 3) times at random moments. Then every delivery in
# the shared store is read through both nodes and against its history.
# Usage: scripts/two-nodes.sh ROOT [DURATION_S] [DRONES_PER_NODE]
# A_ARGS and B_ARGS add loadgen arguments for each side (the nodes post SMS notifications to
# 127.0.0.1:19099, so one side may run --notify-percent P --sms-listen 127.0.0.1:19099).
# Needs release builds, NATS at 127.0.0.1:4222 and PostgreSQL at 127.0.0.1:5432 (database
# test, user postgres, trust auth). Uses ports 14433/18080 (A) and 24433/28080 (B).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$1; DUR=${2:-45}; DRONES=${3:-500}; KILLS=${KILLS:-3}
BIN=${BIN:-$HERE/../target/release}
rm -rf $ROOT; mkdir -p $ROOT
PREFIX=${PREFIX:-TWO$$}; SCHEMA=fs_two_$$
cat > $ROOT/node.toml <<TOML
[log]
backend = "jetstream"
[jetstream]
url = "nats://127.0.0.1:4222"
stream_prefix = "$PREFIX"
subject_prefix = "two$$"
queues = ["notifications", "drone-commands"]
lease_ms = 3000
[notify]
sms_webhook = "http://127.0.0.1:19099/send"
[services]
store = "postgres"
url = "postgresql://postgres@127.0.0.1:5432/test"
schema = "$SCHEMA"
[history]
store = "postgres"
url = "postgresql://postgres@127.0.0.1:5432/test"
schema = "$SCHEMA"
TOML
start() { # name quic http
  FLEETSTREAM_JETSTREAM__NODE_ID=$1 RUST_LOG=warn $BIN/pipeline serve --config $ROOT/node.toml --data-dir $ROOT/$1 \
    --quic 127.0.0.1:$2 --http 127.0.0.1:$3 >> $ROOT/$1.log 2>&1 &
  echo $! > $ROOT/$1.pid
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:$3/readyz >/dev/null && return; sleep 0.5; done
  echo "node $1 did not get ready"
}
start a 14433 18080
start b 24433 28080
echo "$(date +%T) both nodes ready"
$BIN/loadgen --server 127.0.0.1:14433 --api http://127.0.0.1:18080 --ca $ROOT/a/tls/ingest-cert.pem \
  --drones $DRONES --duration $DUR --drone-id-base 1 ${A_ARGS:-} > $ROOT/loadgen-a.txt 2>&1 &
LA=$!
$BIN/loadgen --server 127.0.0.1:24433 --api http://127.0.0.1:28080 --ca $ROOT/b/tls/ingest-cert.pem \
  --drones $DRONES --duration $DUR --drone-id-base 1000001 --center 45.5152,-122.6784 ${B_ARGS:-} > $ROOT/loadgen-b.txt 2>&1 &
LB=$!
for k in $(seq 1 $KILLS); do
  sleep $(python3 -c "import random; print(round(random.uniform(4, $DUR/$KILLS - 3), 1))")
  kill -9 $(cat $ROOT/a.pid); echo "$(date +%T) SIGKILL a"
  sleep 1
  start a 14433 18080; echo "$(date +%T) a restarted"
done
wait $LA; echo "loadgen a exit $?"
wait $LB; echo "loadgen b exit $?"
echo "$SCHEMA $PREFIX" > $ROOT/names
python3 $HERE/compare-nodes.py $SCHEMA
kill $(cat $ROOT/a.pid) $(cat $ROOT/b.pid) 2>/dev/null
while kill -0 $(cat $ROOT/a.pid) 2>/dev/null || kill -0 $(cat $ROOT/b.pid) 2>/dev/null; do sleep 0.5; done
python3 $HERE/delete-streams.py $PREFIX > /dev/null
psql -h 127.0.0.1 -U postgres -d test -qc "DROP SCHEMA $SCHEMA CASCADE" 2>/dev/null
rm -rf $ROOT/a $ROOT/b
