#!/bin/bash
# The crash run: one `pipeline serve`, SIGKILLed and restarted on its data dir KILLS (default
# 3) times at random moments of a 45 s loadgen run; then every delivery's record is checked
# against its history, on the running node and again after a clean restart.
# Usage: scripts/crash-run.sh ROOT embedded|jetstream [loadgen args...]
#   e.g. scripts/crash-run.sh /tmp/crash-1 jetstream --drones 2000 --cancel-percent 10 \
#          --reschedule-percent 10 --notify-percent 20 --sms-listen 127.0.0.1:19099
# Needs release builds (cargo build --release) and, for jetstream, NATS at 127.0.0.1:4222.
# Uses ports 14433 (QUIC), 18080 (HTTP) and 19099 (the stand-in SMS gateway loadgen runs).
# KEEP=1 keeps the data dir (and, on JetStream, the streams) for a look afterwards.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$1; BACKEND=$2; shift 2
KILLS=${KILLS:-3}; DUR=45; BIN=${BIN:-$HERE/../target/release}
rm -rf $ROOT; mkdir -p $ROOT
PREFIX=CR$$
cat > $ROOT/node.toml <<TOML
[notify]
sms_webhook = "http://127.0.0.1:19099/send"
TOML
if [ "$BACKEND" = jetstream ]; then cat >> $ROOT/node.toml <<TOML
[log]
backend = "jetstream"
[jetstream]
url = "nats://127.0.0.1:4222"
stream_prefix = "$PREFIX"
subject_prefix = "cr$$"
queues = ["notifications", "drone-commands"]
TOML
fi
start() {
  RUST_LOG=warn $BIN/pipeline serve --config $ROOT/node.toml --data-dir $ROOT/data --quic 127.0.0.1:14433 --http 127.0.0.1:18080 >> $ROOT/node.log 2>&1 &
  echo $! > $ROOT/pid
  for i in $(seq 1 120); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && return; sleep 0.5; done
  echo "node did not get ready"
}
start
$BIN/loadgen --server 127.0.0.1:14433 --api http://127.0.0.1:18080 --ca $ROOT/data/tls/ingest-cert.pem \
  --duration $DUR "$@" > $ROOT/loadgen.txt 2>&1 &
LG=$!
for k in $(seq 1 $KILLS); do
  sleep $(python3 -c "import random; print(round(random.uniform(4, $DUR/$KILLS - 3), 1))")
  kill -9 $(cat $ROOT/pid); echo "$(date +%T) SIGKILL"
  sleep 1; start; echo "$(date +%T) restarted"
done
wait $LG; echo "loadgen exit $?"
sed -n '/fleetstream load report/,$p' $ROOT/loadgen.txt
sleep 3; echo "check (running node):"; python3 $HERE/check-stages.py http://127.0.0.1:18080
kill $(cat $ROOT/pid); while kill -0 $(cat $ROOT/pid) 2>/dev/null; do sleep 0.5; done; start; sleep 3; echo "check (after a clean restart):"; python3 $HERE/check-stages.py http://127.0.0.1:18080
kill $(cat $ROOT/pid); while kill -0 $(cat $ROOT/pid) 2>/dev/null; do sleep 0.5; done
if [ -z "${KEEP:-}" ]; then python3 $HERE/delete-streams.py $PREFIX > /dev/null; rm -rf $ROOT/data; fi
