#!/usr/bin/env bash
# Checks vmcall on a hardware-KVM host (bare-metal Intel or AMD): the whole test suite, what
# `vmcall info` reports, and the demo guest under --trap xen and --trap rewrite. The xen
# strategy is only verified by a run of this script that ends in "VERIFIED".
# Exit status: 0 verified, 1 a check failed, 2 nothing failed but xen could not be verified here.
# Safe to run again: it only builds and runs (scripts/install-deps.sh adds missing packages).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ ! -e /dev/kvm ]; then
  echo "hw-check: /dev/kvm does not exist: this host has no KVM, nothing to check." >&2
  echo "hw-check: run it on a Linux host with hardware virtualization and the kvm module loaded." >&2
  exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  echo "hw-check: /dev/kvm is not readable and writable by $(id -un) (add yourself to group 'kvm')." >&2
  exit 1
fi
pvm=0
if [ -d /sys/module/kvm_pvm ]; then
  pvm=1
  echo "hw-check: NOTE: /dev/kvm here is kvm_pvm, a software KVM, not hardware KVM:"
  echo "hw-check:       this run checks vmcall, but cannot verify the xen strategy."
fi

bash scripts/install-deps.sh || exit 1
log=$(mktemp -d "${TMPDIR:-/tmp}/vmcall-hw-check.XXXXXX")
failed=0
xen_ok=0
check() { # check NAME COMMAND...: run it, log to $log/NAME.log, print PASS/FAIL
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" >"$log/$name.log" 2>&1; then
    echo "   PASS"
  else
    echo "   FAIL (exit $?): see $log/$name.log"
    tail -n 15 "$log/$name.log" | sed 's/^/   | /'
    failed=1
  fi
}

echo "== build: cargo build --release --locked -p vmcall"
cargo build --release --locked -q -p vmcall || exit 1
vmcall=target/release/vmcall

check info "$vmcall" info
sed 's/^/   | /' "$log/info.log"

check tests cargo test --workspace --locked
awk '/^test result/ { p += $4; f += $6 } END { printf "   | %d tests passed, %d failed\n", p, f }' "$log/tests.log"
grep -E '^SKIP' "$log/tests.log" | sed -E 's/^SKIP [^ ]+ on ([^:]+): /skipped on \1: /' | sort | uniq -c | sed 's/^/   | /'

check demo-rewrite "$vmcall" demo --backend kvm --trap rewrite --stats

echo "== demo-xen: $vmcall demo --backend kvm --trap xen --stats"
"$vmcall" demo --backend kvm --trap xen --stats >"$log/demo-xen.log" 2>&1
status=$?
if [ $status -eq 0 ] && grep -q 'trap=xen' "$log/demo-xen.log"; then
  echo "   PASS"
  xen_ok=1
elif grep -q -- '--trap xen is unavailable' "$log/demo-xen.log"; then
  echo "   SKIP: $(grep -o -- '--trap xen is unavailable.*' "$log/demo-xen.log" | head -n 1)"
else
  echo "   FAIL (exit $status): see $log/demo-xen.log"
  tail -n 15 "$log/demo-xen.log" | sed 's/^/   | /'
  failed=1
fi
if [ $xen_ok -eq 1 ] && grep -q 'SKIP .* on kvm/xen' "$log/tests.log"; then
  echo "   but the test suite skipped kvm/xen: see $log/tests.log"
  failed=1
fi

echo "logs: $log"
if [ $failed -ne 0 ]; then
  echo "hw-check: FAILED"
  exit 1
elif [ $xen_ok -eq 1 ] && [ $pvm -eq 0 ]; then
  echo "hw-check: VERIFIED: every check passed, and the xen strategy ran on hardware KVM"
  exit 0
else
  echo "hw-check: every check passed, but the xen strategy is NOT verified on this host"
  exit 2
fi
