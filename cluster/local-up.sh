#!/usr/bin/env bash
# Start a local 3-node Ray cluster (head + node_a + node_b) on this machine.
# Extra arguments are config overrides, e.g.: cluster/local-up.sh --set object_store_mib=256
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m cluster.local_cluster up --config cluster/local-cluster.yaml "$@"
