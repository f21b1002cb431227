#!/usr/bin/env bash
# docker-compose.yml run for real, as a user would, then its cluster
# (docker-compose.cluster.yml): the stacks up, orders posted, each seen decided
# with psql in the postgres container, a short stress test, reconcile, all
# down with its volumes. Where no registry answers (CI here) it starts a
# private dockerd and builds stand-in images; see crates/xtask/src/compose.rs.
# The last line is
#
#   compose-smoke: posted=N completed=N
#
# Usage: scripts/compose-smoke.sh [--orders N]   (orders per stack, default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
exec "${xtask[@]}" compose-smoke "$@"
