#!/usr/bin/env bash
# Set up and run the vmcall demo: a guest VM making standard and custom hypercalls, on the best
# backend this machine has. Extra arguments go to `vmcall demo` (try --stats, --trace, --trap ud).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install-deps.sh
exec cargo run --release --locked -q -p vmcall -- demo "$@"
