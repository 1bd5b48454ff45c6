//! `vmcall bench --density`: a small fleet of VMs in one process, each parking in a hypercall
//! and then checking the answers of its own run of calls, on each backend.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{bin, guest};

/// Run `vmcall ARGS`, killing it after `limit`; its stdout, stderr and whether it succeeded.
fn vmcall_within(args: &[&str], limit: Duration) -> (String, String, bool) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmcall");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vmcall") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmcall {args:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child.stdout.take().expect("piped").read_to_string(&mut out).expect("stdout");
    child.stderr.take().expect("piped").read_to_string(&mut err).expect("stderr");
    (out, err, status.success())
}

/// One fleet of 8 VMs on `backend`: every VM started, parked, was let go, made all its calls
/// and saw every answer right (its exit status counts wrong ones), and the host counted them.
fn fleet_of_eight(backend: &str) {
    let (out, err, ok) = vmcall_within(
        &["bench", "--density-step", &format!("{backend}:8")],
        Duration::from_secs(120),
    );
    assert!(ok, "fleet on {backend} failed:\n{out}\n{err}");
    let line = out.lines().find(|l| l.starts_with('{')).expect("one line of JSON");
    let f: serde_json::Value = serde_json::from_str(line).expect("valid JSON");
    assert_eq!(f["backend"], backend);
    assert_eq!(f["requested"], 8);
    assert_eq!(f["started"], 8, "{f}");
    assert!(f["limit"].is_null(), "{f}");
    assert_eq!(f["ok_vms"], 8, "every VM ends with 0 wrong answers and the right counts: {f}");
    assert_eq!(f["failures"].as_array().map(Vec::len), Some(0), "{f}");
    let per_vm = f["calls_per_vm"].as_u64().expect("calls_per_vm");
    assert!(per_vm >= 100, "{f}");
    assert!(f["calls_per_s"].as_f64().expect("calls_per_s") > 0.0, "{f}");
    // Start latency is a positive time no larger than the whole bring-up.
    let p99 = f["start_p99_ms"].as_f64().expect("start_p99_ms");
    assert!(p99 > 0.0 && p99 <= f["bring_up_s"].as_f64().expect("bring_up_s") * 1e3, "{f}");
    // Every VM's guest RAM holds at least its image and boot structures.
    assert!(f["guest_ram_kib"].as_u64().expect("guest_ram_kib") >= 8 * 8, "{f}");
}

#[test]
fn eight_vms_at_once_on_the_software_cpu() {
    fleet_of_eight("emu");
}

#[test]
fn eight_vms_at_once_on_kvm() {
    if let Err(e) = vmcall_kvm::KvmHypervisor::open(vmcall_kvm::Trap::Rewrite) {
        let _ = writeln!(std::io::stderr(), "SKIP eight_vms_at_once_on_kvm: {e}");
        return;
    }
    fleet_of_eight("kvm");
}

#[test]
fn density_report_judges_the_targets() {
    // The CI form: a short ladder (1 and 8 VMs) on each backend, the report and its verdicts.
    let (out, err, ok) = vmcall_within(&["bench", "--density", "8"], Duration::from_secs(300));
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("Density targets"), "{out}");
    assert!(out.contains("emu") && out.contains("     8 "), "{out}");
    // Eight VMs is below the targets' thousand: the report says it does not judge them.
    assert!(out.contains("not judged"), "{out}");
}

#[test]
fn instances_run_side_by_side_with_their_own_console_prefix() {
    let (out, err, ok) = vmcall_within(
        &[
            "run",
            guest("demo"),
            "--instances",
            "4",
            "--backend",
            "emu",
            "--hypercall",
            "20=const:5",
        ],
        Duration::from_secs(60),
    );
    assert!(ok, "{out}\n{err}");
    for i in 0..4 {
        let mine: Vec<&str> = out.lines().filter(|l| l.starts_with(&format!("[{i}] "))).collect();
        assert!(
            mine.iter().any(|l| l.ends_with("KVM_HC_MY_VMCALL(41)       -> 5")),
            "instance {i} shares the table:\n{out}"
        );
    }
    assert!(out.lines().all(|l| l.starts_with('[')), "every line has its prefix:\n{out}");
    assert!(err.contains("4 instances"), "{err}");
}

#[test]
fn instances_get_their_number_and_the_first_failure_sets_the_status() {
    // The density guest checks that hypercall 21 answers its id + 1: const:1 is right for
    // instance 0 only, so instances 1 and 2 each see one wrong answer and exit 1.
    let backends: &[&str] = if vmcall_kvm::KvmHypervisor::open(vmcall_kvm::Trap::Auto).is_ok() {
        &["emu", "kvm"]
    } else {
        let _ = writeln!(std::io::stderr(), "SKIP instances on kvm: KVM unavailable");
        &["emu"]
    };
    for backend in backends {
        let o = Command::new(bin())
            .args(["run", guest("density"), "--instances", "3", "--backend", backend])
            .args([
                "--hypercall",
                "21=const:1",
                "--timeout",
                "60s",
                "--",
                "{instance}",
                "0",
                "21",
                "20",
            ])
            .output()
            .expect("run vmcall");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{backend}: {err}");
        assert!(!err.contains("instance 0:"), "{backend}: {err}");
        assert!(err.contains("instance 1: exit 1") && err.contains("instance 2: exit 1"), "{err}");
        assert!(err.contains("2 of 3 instances did not end with 0"), "{backend}: {err}");
    }
}

#[test]
fn instances_refuse_what_works_with_one_vm_only() {
    // A usage error (exit 2, nothing run), like every other flag vmcall cannot use as given.
    let flags =
        [&["--control"][..], &["--stats-json", "-"], &["--trace-json", "-"], &["--record", "-"]];
    for flag in flags {
        let o = Command::new(bin())
            .args(["run", guest("demo"), "--instances", "2", "--backend", "emu"])
            .args(flag)
            .output()
            .expect("run vmcall");
        assert_eq!(o.status.code(), Some(2), "{flag:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("works with one VM; not with --instances"), "{flag:?}: {err}");
    }
}
