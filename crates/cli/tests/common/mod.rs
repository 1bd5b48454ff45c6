//! Helpers shared by the CLI's integration tests: run the `vmcall` binary, read its output,
//! find the test guests, skip visibly without KVM, and make scratch directories. Each test file
//! is its own crate and uses only some of them.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output};

/// The `vmcall` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmcall")
}

/// Run `vmcall` with `args` and wait for it. Every run that starts a guest has a time limit:
/// `--timeout` where the test gives one, vmcall's default (30 s) otherwise.
pub fn vmcall(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run vmcall")
}

/// `vmcall` as on a host without KVM (`VMCALL_NO_KVM=1`).
pub fn vmcall_no_kvm(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("VMCALL_NO_KVM", "1").output().expect("run vmcall")
}

/// A run's stdout and stderr, as text.
pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

/// The path of test guest `name`.
pub fn guest(name: &str) -> &'static str {
    vmcall_test_guests::path(name).expect("guest exists")
}

/// Whether KVM can run guests here; if not, says `SKIP {what}` and why on stderr.
pub fn kvm_available(what: &str) -> bool {
    match vmcall_kvm::KvmHypervisor::open(vmcall_kvm::Trap::Auto) {
        Ok(_) => true,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIP {what}: {e}");
            false
        }
    }
}

/// An empty scratch directory for `test`, named after the test file and this process.
pub fn scratch(test: &str) -> PathBuf {
    let name = format!("vmcall-{}-{test}-{}", env!("CARGO_CRATE_NAME"), std::process::id());
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
