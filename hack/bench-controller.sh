#!/bin/sh
# Controller benchmark: `registry-addon serve` as a child process with the real reconciler,
# against one in-memory management API server and one in-memory workload API server per
# Cluster. 1,000 Clusters (BENCH_CLUSTERS), deployed once (prepare), then a cold start until
# every cluster is reconciled, then a resync (BENCH_RESYNC, default 30s) that must write
# nothing; serve's own RSS from /proc.
#
# The harness is built in the dev profile; serve is this build's binary unless BIN
# names another one, e.g. the release binary from hack/build-image.sh:
#   BIN=target/x86_64-unknown-linux-gnu/release/registry-addon hack/bench-controller.sh
set -eu
cd "$(dirname "$0")/.."
if [ -n "${BIN:-}" ]; then
    BIN=$(realpath "$BIN")
    export BIN
fi
exec cargo bench --profile dev --bench controller
