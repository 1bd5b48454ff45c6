//! The command-line conventions: usage errors exit 2 in clap's format, `--version` says what is
//! built in and under which license, completions and a man page, `-q`, `info --json`, `-` for
//! stdout, and `--timeout` zero in any unit meaning no limit.

mod common;

use common::{guest, text, vmcall, vmcall_no_kvm};

/// Every value vmcall cannot use is refused when parsing, as clap refuses its own: status 2,
/// `error: ...` and the usage hint, and no VM built.
#[test]
fn out_of_range_values_are_usage_errors() {
    let demo = guest("demo");
    for (args, want) in [
        (&["run", demo, "--memory", "3M"][..], "multiple of 2M"),
        (&["run", demo, "--memory", "128G"][..], "multiple of 2M from 2M to 64G"),
        (&["run", demo, "--vcpus", "0"][..], "0 is not in 1..=64"),
        (&["run", demo, "--vcpus", "65"][..], "65 is not in 1..=64"),
        (&["run", demo, "--hypercall", "1=const:5"][..], "use --override 1=const:5"),
        (&["run", demo, "--pv-features", "0x100000000"][..], "does not fit in 32 bits"),
        (&["run", demo, "--exec-deadline", "0s"][..], "not a positive duration"),
        (&["run", demo, "--backend", "emu", "--trap", "ud"][..], "--trap ud needs the kvm backend"),
        (&["demo", "--backend", "emu", "--trap", "rewrite"][..], "needs the kvm backend"),
        (
            &["run", demo, "--hypercall", "30=echo", "--hypercall", "30=add"][..],
            "hypercall 30 already has a handler",
        ),
        (&["demo", "--hypercall", "20=echo"][..], "hypercall 20 already has a handler"),
    ] {
        let o = vmcall(args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.starts_with("error: ") && err.contains(want), "{args:?}: {err}");
        assert!(err.contains("For more information, try '--help'."), "{args:?}: {err}");
        assert!(!err.contains("vmcall: "), "{args:?} built a VM: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
}

/// `--backend auto` without a usable KVM cannot honour an explicit `--trap`: an error that
/// says why, not a silent run on the software CPU.
#[test]
fn an_explicit_trap_without_kvm_is_an_error() {
    let o = vmcall_no_kvm(&["demo", "--trap", "ud"]);
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("--trap ud needs the kvm backend") && err.contains("VMCALL_NO_KVM"),
        "{err}"
    );
    assert!(!err.contains("using the software CPU"), "{err}");
}

#[test]
fn version_lists_backends_and_license() {
    let (out, _) = text(&vmcall(&["--version"]));
    assert!(out.starts_with(&format!("vmcall {}\n", env!("CARGO_PKG_VERSION"))), "{out}");
    assert!(out.contains("backends: kvm (/dev/kvm), emu (software CPU, unicorn)"), "{out}");
    // The tests build the default features: the software CPU is in, so the GPL applies.
    assert!(out.contains("license: GPL-2.0-only"), "{out}");
    assert!(out.contains("wasm handlers: yes"), "{out}");
    let (short, _) = text(&vmcall(&["-V"]));
    assert_eq!(short.trim(), format!("vmcall {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn help_documents_exit_statuses() {
    let (out, _) = text(&vmcall(&["--help"]));
    let out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    for word in ["124", "125", "2 for a usage error", "guest that itself exits", "-q, --quiet"] {
        assert!(out.contains(word), "--help lacks {word:?}:\n{out}");
    }
    let (out, _) = text(&vmcall(&["-h"]));
    assert!(out.contains("Exit status:"), "{out}");
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _vmcall"),
        ("zsh", "#compdef vmcall"),
        ("fish", "complete -c vmcall"),
        ("elvish", "vmcall"),
        ("powershell", "vmcall"),
    ] {
        let o = vmcall(&["completions", shell]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{shell}: {err}");
        assert!(out.contains(marker), "{shell}: {out}");
        // Subcommands and their options are completed.
        assert!(out.contains("hypercall") && out.contains("ctl"), "{shell}");
    }
    let o = vmcall(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn man_page_covers_subcommands_and_exit_status() {
    let o = vmcall(&["man"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains(".TH vmcall 1"), "{out}");
    for section in [".SH \"VMCALL RUN\"", ".SH \"VMCALL CTL\"", ".SH ENVIRONMENT", "NO_COLOR"] {
        assert!(out.contains(section), "man page lacks {section}");
    }
    assert!(out.contains("\\-\\-hypercall"), "run's options are in the page");
    assert!(out.contains("124") && out.contains("125"), "exit statuses are in the page");
}

#[test]
fn info_reports_json_and_says_whether_anything_runs() {
    let o = vmcall(&["info", "--json"]);
    let (out, err) = text(&o);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("info --json is JSON");
    // The software CPU is built into the test binary and runs everywhere.
    assert_eq!(doc["emu"]["usable"], true, "{out}");
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(doc["auto_backend"] == "kvm" || doc["auto_backend"] == "emu", "{out}");
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));

    let o = vmcall_no_kvm(&["info", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["kvm"]["usable"], false);
    assert!(doc["kvm"]["reason"].as_str().unwrap().contains("VMCALL_NO_KVM"), "{doc}");
    assert_eq!(doc["auto_backend"], "emu");
    assert_eq!(o.status.code(), Some(0));
    // A KVM-only vmcall with KVM hidden can run nothing and exits 1: .ci/run checks that
    // build, which the tests here do not make.
}

/// `-q` drops the notes (which backend, which socket), not the guest's output or errors.
#[test]
fn quiet_drops_notes_only() {
    let o = vmcall(&["demo", "--backend", "emu"]);
    assert!(text(&o).1.contains("vmcall: emu backend"), "{}", text(&o).1);
    let o = vmcall(&["-q", "demo", "--backend", "emu"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "-q: {err}");
    assert!(out.contains("KVM_HC_MY_VMCALL(41)       -> 42"), "{out}");
    let o = vmcall(&["demo", "--backend", "emu", "-q", "--memory", "3M"]);
    assert_eq!(o.status.code(), Some(2), "errors still print");
    assert!(text(&o).1.contains("multiple of 2M"));
    let o = vmcall(&["-q", "-v", "info"]);
    assert_eq!(o.status.code(), Some(2), "-q and -v conflict");
}

/// Zero in any unit is "no limit", as `0` and `none` are: the demo runs to its end.
#[test]
fn timeout_zero_in_any_unit_means_no_limit() {
    for zero in ["0", "0s", "0ms", "none"] {
        let o = vmcall(&["demo", "--backend", "emu", "--timeout", zero]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "--timeout {zero}: {err}");
        assert!(out.contains("hypercall 0xdead (unknown) -> -1000"), "{out}");
    }
}

/// `-` is stdout for every file vmcall writes: statistics and trace as JSON.
#[test]
fn dash_is_stdout_for_every_json_file() {
    let o = vmcall(&["-q", "demo", "--backend", "emu", "--stats-json", "-"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let json = &out[out.find("{\n").expect("JSON on stdout")..];
    let doc: serde_json::Value = serde_json::from_str(json).expect("stats JSON");
    assert!(doc.is_object(), "{doc}");
    let o = vmcall(&["-q", "demo", "--backend", "emu", "--trace-json", "-"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let calls: Vec<serde_json::Value> = out
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert!(calls.iter().any(|c| c["nr"] == "0x14" && c["handler"] == "my_vmcall"), "{out}");
}
