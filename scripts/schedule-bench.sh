#!/bin/bash
# The scheduling benchmark: `pipeline serve` on a fresh data dir, then
# `loadgen --schedule-bench 256 --drones 200000 --duration 10` against it.
# Usage: scripts/schedule-bench.sh [BINDIR] [TAG]   (BINDIR default: target/release)
# Uses ports 14433 (QUIC) and 18080 (HTTP); the data dir is deleted afterwards.
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=${1:-$HERE/../target/release}; TAG=${2:-run}; D=$(mktemp -d)/data-$TAG
RUST_LOG=warn $BIN/pipeline serve --data-dir $D --quic 127.0.0.1:14433 --http 127.0.0.1:18080 > /dev/null 2>&1 &
P=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.5; done
$BIN/loadgen --server 127.0.0.1:14433 --api http://127.0.0.1:18080 --ca $D/tls/ingest-cert.pem \
  --schedule-bench 256 --drones 200000 --duration 10 2>&1 | tail -4
kill $P; wait $P; rm -rf "$(dirname $D)"
