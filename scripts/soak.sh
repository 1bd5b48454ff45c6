#!/usr/bin/env bash
# Soak and load (docs/security.md, "Resources"): many VMs at once on each backend, every vCPU
# making many hypercalls while their handler is swapped, round after round; checks that no
# call is lost, that every VM ends cleanly and that RSS stays flat.
#
#   scripts/soak.sh            the full run: 32 VMs per backend at once, 4 vCPUs each,
#                              1,000,000 calls per vCPU on the software CPU and 2,000 on KVM
#                              (kvm_pvm runs guest code ~1 µs/instruction), 4 rounds
#   scripts/soak.sh --short    the CI version (well under a minute)
#   scripts/soak.sh ARGS...    any of: --vms N --vcpus N --emu-calls N --kvm-calls N
#                              --rounds N --backend emu|kvm|both
set -euo pipefail
cd "$(dirname "$0")/.."

args=("$@")
if [ "${1:-}" = "--short" ]; then
  args=(--vms 32 --vcpus 2 --emu-calls 20000 --kvm-calls 200 --rounds 6)
fi
cargo build --release --locked --quiet -p vmcall-conformance --bin soak
exec target/release/soak "${args[@]}"
