#!/usr/bin/env bash
# Soak: the whole system under a steady load for a long while, one row a minute,
# then soak-report's verdict (`cargo xtask soak`, crates/xtask/src/soak.rs); rows
# to .run/soak/soak.csv, non-zero exit when the run fails. `--help`: the options.
#   scripts/soak.sh                         # 30 minutes at half the measured peak
#   scripts/soak.sh --minutes 3 --rate 100  # a short check
#   scripts/soak.sh --chart docs/soak.svg   # the chart where it will be committed
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/services.sh
case " $* " in *" -h "* | *" --help "*) exec cargo xtask soak --help ;; esac
ensure_services
export PG_HOST PG_PORT AMQP_HOST AMQP_PORT
exec cargo xtask soak "$@"
