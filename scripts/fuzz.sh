#!/usr/bin/env bash
# Coverage-guided fuzzing of vmcall's guest- and user-facing parsers (docs/fuzzing.md).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]   fuzz each target for SECONDS (default 60)
#   scripts/fuzz.sh --replay [TARGET|all]    run the committed corpus once (a regression check)
#   scripts/fuzz.sh --merge [TARGET|all]     minimise the committed corpus plus what runs found
#   scripts/fuzz.sh --list                   the targets
#
# libFuzzer (through the libfuzzer-sys crate) on the stable toolchain: cargo builds the
# targets with the same SanitizerCoverage flags cargo-fuzz passes, none of which needs nightly.
# Not --locked: fuzz/Cargo.lock follows the workspace's dependencies, which may gain a crate
# before it does (cargo then adds that crate and changes nothing else).
# New inputs go to fuzz/target/corpus/TARGET, crashes to fuzz/artifacts/TARGET; the committed
# seeds in fuzz/corpus/TARGET are only read. Prints executions and executions per second per
# target; exits non-zero if any target crashed.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

TRIPLE=x86_64-unknown-linux-gnu
TARGETS=(elf hypercall trap_decode paging devices descriptors)
BIN=target/$TRIPLE/release

max_len() {
  case "$1" in
    elf) echo 65536 ;;
    trap_decode) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

# libfuzzer-sys compiles libFuzzer itself, which takes a C++ compiler.
if ! command -v g++ >/dev/null; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq g++
fi

build() {
  # --target keeps these flags away from build scripts and proc macros (as cargo-fuzz does).
  RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cforce-frame-pointers" \
    cargo build --release --quiet --target "$TRIPLE" --bins
}

pick() {
  if [ "${1:-all}" = all ]; then
    echo "${TARGETS[@]}"
  elif [[ " ${TARGETS[*]} " == *" $1 "* ]]; then
    echo "$1"
  else
    echo "unknown fuzz target '$1' (targets: ${TARGETS[*]})" >&2
    exit 2
  fi
}

case "${1:-}" in
  --list)
    printf '%s\n' "${TARGETS[@]}"
    ;;
  --replay)
    build
    for t in $(pick "${2:-all}"); do
      echo "== replay $t ($(ls corpus/$t | wc -l) inputs)"
      "$BIN/$t" -runs=0 "corpus/$t" 2>&1 | grep -E "^(Done|INFO: seed corpus)|ERROR|panicked" || true
      "$BIN/$t" -runs=0 "corpus/$t" >/dev/null 2>&1
    done
    ;;
  --merge)
    build
    for t in $(pick "${2:-all}"); do
      mkdir -p "target/corpus/$t"
      rm -rf "target/merged/$t" && mkdir -p "target/merged/$t"
      "$BIN/$t" -merge=1 -max_len="$(max_len "$t")" "target/merged/$t" "corpus/$t" "target/corpus/$t" 2>&1 | tail -1
      rm -rf "corpus/$t" && mv "target/merged/$t" "corpus/$t"
      echo "$t: $(ls "corpus/$t" | wc -l) inputs, $(du -sh "corpus/$t" | cut -f1)"
    done
    ;;
  *)
    secs="${2:-60}"
    targets=$(pick "${1:-all}")
    echo "== build (libFuzzer, stable $(rustc --version | cut -d' ' -f2))"
    build
    failed=0
    summary=""
    for t in $targets; do
      mkdir -p "target/corpus/$t" "artifacts/$t"
      log="target/fuzz-$t.log"
      echo "== fuzz $t for ${secs}s"
      set +e
      "$BIN/$t" "target/corpus/$t" "corpus/$t" -max_total_time="$secs" -max_len="$(max_len "$t")" \
        -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"$log" 2>&1
      rc=$?
      set -e
      execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
      rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
      cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
      line=$(printf '%-12s %12s execs %8s/s  cov %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}")
      if [ $rc -ne 0 ]; then
        failed=1
        line="$line  CRASH (exit $rc): see fuzz/$log and fuzz/artifacts/$t/"
        grep -E "panicked at|ERROR: libFuzzer" "$log" | head -5 >&2 || true
      fi
      echo "$line"
      summary="$summary$line"$'\n'
    done
    echo "== fuzz summary (${secs}s per target)"
    printf '%s' "$summary"
    exit $failed
    ;;
esac
