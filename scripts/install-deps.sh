#!/usr/bin/env bash
# Installs the system packages vmcall's build needs, if they are missing (idempotent).
# Debian/Ubuntu: uses apt-get (as root, or through sudo when available).
set -euo pipefail

missing=()
command -v gcc >/dev/null || missing+=(gcc)
command -v ld >/dev/null || missing+=(binutils)
# The software-CPU backend builds the unicorn engine from source.
command -v cmake >/dev/null || missing+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
# WebAssembly hypercall handlers in C (sdk/wasm, docs/wasm.md): clang --target=wasm32 and
# wasm-ld, which Debian's lld package provides. The tests build a C handler with them.
command -v clang >/dev/null || missing+=(clang)
command -v wasm-ld >/dev/null || missing+=(lld)
# The gdb remote stub's tests (crates/cli/tests/gdb.rs, docs/gdb.md) drive a real gdb.
command -v gdb >/dev/null || missing+=(gdb)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${missing[@]}"
fi
command -v cargo >/dev/null || {
  echo "vmcall needs a Rust toolchain (cargo, rustc >= 1.88): see https://rustup.rs" >&2
  exit 1
}
