#!/usr/bin/env bash
# Property-based fuzzing of order-service from its own OpenAPI document with
# schemathesis, `cargo xtask fuzz-api` (crates/xtask/src/fuzz.rs), after making
# sure the local Postgres runs: invalid requests only (each a documented 4xx,
# and no row written), then every kind (no 5xx, answers as documented). Prints
# how many requests each phase generated; exits non-zero on any failure.
#
#   FUZZ_EXAMPLES (300) examples per operation and phase; FUZZ_MAX_TIME (60) seconds per phase
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
ensure_postgres
export PG_HOST PG_PORT
exec "${xtask[@]}" fuzz-api "$@"
