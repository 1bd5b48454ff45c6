//! The `vmcall` command as a user meets it: exit statuses, error messages, help.

mod common;

use common::{guest, kvm_available, text, vmcall, vmcall_no_kvm};

/// The strategy `--trap auto` picks on this KVM (xen where the intercept is available).
fn auto_trap() -> vmcall_kvm::Trap {
    vmcall_kvm::KvmHypervisor::open(vmcall_kvm::Trap::Auto).expect("KVM available").resolved_trap()
}

#[test]
fn help_lists_commands_and_options() {
    let (out, _) = text(&vmcall(&["--help"]));
    for word in ["run", "demo", "info", "124", "125"] {
        assert!(out.contains(word), "--help lacks {word}:\n{out}");
    }
    let (out, _) = text(&vmcall(&["run", "--help"]));
    for word in [
        "--hypercall",
        "--override",
        "--memory",
        "--vcpus",
        "--timeout",
        "--trap",
        "--stats",
        "--trace",
        "--no-seccomp",
        "const:V",
    ] {
        assert!(out.contains(word), "run --help lacks {word}:\n{out}");
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let o = vmcall(&["run", "/nonexistent/guest.elf"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("cannot read guest '/nonexistent/guest.elf'"), "{:?}", text(&o));

    let o = vmcall(&["run", concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")]);
    assert_eq!(o.status.code(), Some(125));
    let err = text(&o).1;
    assert!(err.contains("invalid guest ELF") && err.contains("not an ELF file"), "{err}");

    for (args, want) in [
        (&["run", "x", "--hypercall", "20=bogus"][..], "unknown handler kind 'bogus'"),
        (&["run", "x", "--hypercall", "20"][..], "expected NR=HANDLER"),
        (&["run", "x", "--memory", "12Q"][..], "unknown size unit"),
        (&["run", "x", "--timeout", "soon"][..], "not a duration"),
        (&["run", "x", "--backend", "qemu"][..], "invalid value 'qemu'"),
        (&["run", "x", "--trap", "int3"][..], "invalid value 'int3'"),
        (&["run", "x", "--vcpus", "many"][..], "invalid value 'many'"),
        (&["run", "x", "--hypercall", "20=errno:EWHAT"][..], "unknown error name 'EWHAT'"),
        (&["frobnicate"][..], "unrecognized subcommand"),
    ] {
        let o = vmcall(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o).1.contains(want), "{args:?}: {}", text(&o).1);
    }
}

/// A usage error (exit status 2, clap's format), before anything runs.
#[test]
fn shadowing_a_standard_number_needs_override() {
    let o = vmcall(&["run", guest("demo"), "--hypercall", "1=const:5"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o).1;
    assert!(err.contains("KVM_HC_VAPIC_POLL_IRQ") && err.contains("--override"), "{err}");
}

#[test]
fn without_kvm_auto_falls_back_to_the_emulator_and_says_why() {
    let run = |backend: &str| vmcall_no_kvm(&["demo", "--backend", backend]);
    let o = run("kvm");
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("KVM is disabled by VMCALL_NO_KVM"), "{}", text(&o).1);
    let o = run("auto");
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("KVM is disabled by VMCALL_NO_KVM; using the software CPU backend"),
        "{err}"
    );
    assert!(out.contains("KVM_HC_MY_VMCALL(41)       -> 42"), "{out}");
}

/// `--trap xen` runs where KVM has the Xen hypercall intercept, and elsewhere is an error that
/// names the missing capability, never a silent fall back to another backend.
#[test]
fn trap_xen_runs_or_names_the_missing_capability() {
    if !kvm_available("trap_xen_runs_or_names_the_missing_capability") {
        return;
    }
    let xen = vmcall_kvm::KvmHypervisor::open(vmcall_kvm::Trap::Xen);
    for backend in ["kvm", "auto"] {
        let o = vmcall(&["demo", "--backend", backend, "--trap", "xen"]);
        let (out, err) = text(&o);
        if xen.is_ok() {
            assert_eq!(o.status.code(), Some(0), "{err}");
            assert!(err.contains("kvm backend: trap=xen"), "{err}");
            assert!(out.contains("KVM_HC_MY_VMCALL(41)       -> 42"), "{out}");
        } else {
            assert_eq!(o.status.code(), Some(125), "{out}{err}");
            assert!(
                err.contains("--trap xen is unavailable") && err.contains("KVM_CAP_XEN_HVM ="),
                "{err}"
            );
            assert!(!err.contains("software CPU"), "--backend {backend}: {err}");
        }
    }
}

#[test]
fn the_emulator_runs_guests_anywhere() {
    let o = vmcall(&[
        "run",
        guest("modes"),
        "--backend",
        "emu",
        "--hypercall",
        "20=echo",
        "--hypercall",
        "21=const:7",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("emu backend: unicorn"), "{err}");
    assert!(out.contains("cpl3 vmcall nr=20 ret=-1"), "{out}");
    let o = vmcall(&["run", guest("bad"), "--backend", "emu", "--timeout", "1s", "--", "loop"]);
    assert_eq!(o.status.code(), Some(124), "{:?}", text(&o));
}

/// On the best backend here (`--backend auto`): KVM, or the software CPU without /dev/kvm.
#[test]
fn runs_guests_and_passes_their_status_through() {
    let o = vmcall(&["demo", "--stats", "--timeout", "60s"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("KVM_HC_MY_VMCALL(41)       -> 42"), "{out}");
    assert!(err.contains("KVM_HC_VAPIC_POLL_IRQ") && err.contains("my_vmcall"), "{err}");
    let backend = if kvm_available("runs_guests_and_passes_their_status_through on kvm") {
        format!("kvm backend: trap={}", auto_trap().name())
    } else {
        "emu backend: unicorn".into()
    };
    assert!(err.contains(&backend), "{err}");

    let o =
        vmcall(&["run", guest("calls"), "--hypercall", "20=const:0x100000000", "--", "5", "20"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // const 0x1_0000_0000 is tag 1 with low bits 0: only the call with i = 0 matches.
    assert!(out.contains("calls n=5 tag1=1 tag2=0 tag3=0 enosys=0 wrong=4"), "{out}");

    let o = vmcall(&["run", guest("bad"), "--", "panic"]);
    assert_eq!(o.status.code(), Some(101), "{:?}", text(&o));

    let o = vmcall(&["run", guest("bad"), "--", "null"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("#PF page fault (vector 14)"), "{}", text(&o).1);

    let o = vmcall(&["run", guest("bad"), "--timeout", "1s", "--", "loop"]);
    assert_eq!(o.status.code(), Some(124));
    assert!(text(&o).1.contains("did not finish within 1s"), "{}", text(&o).1);

    let o = vmcall(&[
        "run",
        guest("demo"),
        "--trace",
        "--hypercall",
        "20=log",
        "--hypercall",
        "21=errno:EINVAL",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("hypercall 21(1, 2, 3, 4)   -> -22"), "{out}");
    assert!(
        err.contains("vmcall: log: vCPU 0 hypercall 0x14 (64-bit) a0=0x29"),
        "log handler output: {err}"
    );
    assert!(
        err.contains("vmcall: trace: hypercall vcpu=0 nr=0x15 a0=0x1 a1=0x2 a2=0x3 a3=0x4 ret=-0x16 cpl=0 mode=64-bit rip=0x")
            && err.contains("by=custom handler=errno:EINVAL"),
        "trace: {err}"
    );
    // One prefix style on stderr: every line is vmcall's.
    assert!(err.lines().all(|l| l.starts_with("vmcall: ")), "{err}");
}

/// `vmcall bench` measures every line and writes them as JSON (figures are not asserted:
/// speed is for the benchmark to report, not for tests to judge).
#[test]
fn bench_reports_every_line_as_json() {
    let json = std::env::temp_dir().join(format!("vmcall-bench-{}.json", std::process::id()));
    let o = vmcall(&[
        "bench",
        "--rounds",
        "1",
        "--calls",
        "50",
        "--emu-calls",
        "2000",
        "--json",
        json.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    for key in [
        "kernel",
        "bare-exit",
        "vmcall-emu",
        "emu-raw",
        "batch64-emu",
        "cold-raw",
        "cold-emu",
        "exec-emu",
        "ctl-set-emu",
        "targets",
    ] {
        assert!(out.contains(key), "no {key} in\n{out}");
    }
    let doc = std::fs::read_to_string(&json).unwrap();
    let _ = std::fs::remove_file(&json);
    for key in [
        "\"per_call\"",
        "\"cold_start\"",
        "\"memory\"",
        "\"targets\"",
        "\"median_ns\"",
        "\"ratio_to_baseline\"",
    ] {
        assert!(doc.contains(key), "no {key} in {doc}");
    }
    // The software CPU runs everywhere, so its lines always have figures.
    let emu_line = out.lines().find(|l| l.starts_with("vmcall-emu ")).unwrap();
    let median = emu_line.split_whitespace().nth(1).unwrap();
    assert!(median.ends_with("ns") || median.ends_with("µs"), "{emu_line}");
}

/// `--no-seccomp` runs the same guest the same way, without the filters (docs/security.md).
#[test]
fn no_seccomp_runs_without_filters() {
    for extra in [&[][..], &["--no-seccomp"][..]] {
        let mut args = vec!["demo", "--backend", "emu", "--stats"];
        args.extend(extra);
        let o = vmcall(&args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        assert!(out.contains("KVM_HC_MY_VMCALL(41)       -> 42"), "{args:?}: {out}");
    }
}

/// `vmcall bench` refuses runs of no calls as a usage error, before measuring anything.
#[test]
fn bench_with_no_calls_is_a_usage_error() {
    for flag in ["--calls", "--emu-calls"] {
        let o = vmcall(&["bench", flag, "0"]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{flag} 0: {err}");
        assert!(err.contains(flag), "{err}");
    }
}
