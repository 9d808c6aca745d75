#!/bin/sh
# Controller benchmark against the in-memory API server: 1,000 converged Clusters (override
# with BENCH_CLUSTERS), cold start until all are reconciled, a resync that must write
# nothing, and the process's RSS. Release build.
set -eu
cd "$(dirname "$0")/.."
exec cargo test --release --test controller_bench -- --ignored --nocapture bench_controller_1000_clusters
