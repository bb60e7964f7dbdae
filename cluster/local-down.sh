#!/usr/bin/env bash
# Stop the local Ray cluster that cluster/local-up.sh started (only its processes).
# Usage: cluster/local-down.sh [--state-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m cluster.local_cluster down "$@"
