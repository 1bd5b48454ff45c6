//! `vmcall run --record`, `vmcall replay` and `vmcall stats` (docs/record.md): a recording
//! replays with no diff on the backend that made it and on the other one, a changed handler
//! is reported call by call, a re-run that diverges is pinned to its first different call.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

mod common;

use common::{guest, kvm_available, scratch, text, vmcall};

/// Record `calls N 20` (hypercall 20 with a0 = 0..N) answered by `spec` on `backend`.
fn record(file: &Path, backend: &str, spec: &str, n: &str) {
    let spec = format!("20={spec}");
    let o = vmcall(&[
        "run",
        guest("calls"),
        "--backend",
        backend,
        "--timeout",
        "60s",
        "--hypercall",
        &spec,
        "--record",
        file.to_str().unwrap(),
        "--",
        n,
        "20",
    ]);
    assert_eq!(o.status.code(), Some(0), "{backend}: {:?}", text(&o));
}

#[test]
fn a_recording_replays_with_no_diff_on_both_backends() {
    let d = scratch("nodiff");
    let mut backends = vec!["emu"];
    if kvm_available("a_recording_replays_with_no_diff_on_both_backends (KVM part)") {
        backends.push("kvm");
    }
    for made_on in &backends {
        let file = d.join(format!("{made_on}.jsonl"));
        record(&file, made_on, "echo", "20");
        let f = file.to_str().unwrap();
        let header: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&file).unwrap().lines().next().unwrap())
                .unwrap();
        assert_eq!(header["backend"], *made_on);
        assert_eq!(header["table"][0]["name"], "echo");

        // Without a guest, with the recorded table.
        let o = vmcall(&["replay", f]);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{out}{err}");
        assert!(out.contains("total: 20 calls, 20 same, 0 changed, 0 not replayed"), "{out}");
        // Re-running the guest on every backend gives the same stream, call for call.
        for rerun_on in &backends {
            let o = vmcall(&["replay", f, "--guest", guest("calls"), "--backend", rerun_on]);
            let (out, err) = text(&o);
            assert_eq!(o.status.code(), Some(0), "{made_on} -> {rerun_on}: {out}{err}");
            assert!(out.contains("the same stream, call for call"), "{out}");
            assert!(out.contains(&format!("re-run on {rerun_on}: 20 calls")), "{out}");
        }
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_changed_handler_is_reported_call_by_call_and_exits_1() {
    let d = scratch("changed");
    let file = d.join("r.jsonl");
    record(&file, "emu", "echo", "10");
    // const:3 answers what echo answered only for a0 = 3 (seq 3).
    let o = vmcall(&["replay", file.to_str().unwrap(), "--hypercall", "20=const:3"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    let changed: Vec<u64> = out
        .lines()
        .filter_map(|l| l.strip_prefix("changed seq "))
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(changed, vec![0, 1, 2, 4, 5, 6, 7, 8, 9], "{out}");
    assert!(
        out.contains("changed seq 4 vcpu 0 nr 0x14 args 0x4 0x0 0x0 0x0: recorded 0x4 by echo, replayed 0x3 by const:3"),
        "{out}"
    );
    assert!(out.contains("nr 0x14: 9 of 10 calls changed"), "{out}");
    assert!(out.contains("total: 10 calls, 1 same, 9 changed, 0 not replayed"), "{out}");

    // Through stdin, and with --limit.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmcall"))
        .args(["replay", "-", "--hypercall", "20=errno:ENOSYS", "--limit", "2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&std::fs::read(&file).unwrap()).unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("changed seq")).count(), 2, "{out}");
    assert!(out.contains("replayed -0x3e8 (-KVM_ENOSYS) by errno:ENOSYS"), "{out}");
    assert!(out.contains("... and 8 more changed calls"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_diverging_rerun_names_its_first_different_call() {
    let d = scratch("diverge");
    let file = d.join("r.jsonl");
    record(&file, "emu", "echo", "10");
    let f = file.to_str().unwrap();
    // A handler that answers differently from a0 = 5 on.
    let wat = d.join("h.wat");
    std::fs::write(
        &wat,
        r#"(module (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
             (if (result i64) (i64.lt_u (local.get 1) (i64.const 5))
               (then (local.get 1)) (else (i64.const 99)))))"#,
    )
    .unwrap();
    let spec = format!("20=wasm:{}", wat.display());
    let o =
        vmcall(&["replay", f, "--guest", guest("calls"), "--backend", "emu", "--hypercall", &spec]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("first divergence: vCPU 0, its call #5"), "{out}");
    assert!(out.contains("recorded: seq 5: nr 0x14 args 0x5 0x0 0x0 0x0"), "{out}");
    let rerun = out.lines().find(|l| l.trim_start().starts_with("re-run:")).unwrap();
    assert!(rerun.contains("args 0x5 0x0 0x0 0x0") && rerun.contains("-> 0x63 by wasm:"), "{out}");
    // The guest saw 99 for five calls: it prints them as wrong, and so its answers differ.
    assert!(out.contains("the streams differ"), "{out}");

    // A guest that makes fewer calls: the recording's next call has no counterpart.
    let mut short = std::fs::read_to_string(&file).unwrap();
    short = short.replacen("\"cmdline\":\"10 20\"", "\"cmdline\":\"7 20\"", 1);
    let shortf = d.join("short.jsonl");
    std::fs::write(&shortf, short).unwrap();
    let o = vmcall(&[
        "replay",
        shortf.to_str().unwrap(),
        "--guest",
        guest("calls"),
        "--backend",
        "emu",
    ]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("its call #7") && out.contains("re-run:   no more calls on this vCPU"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn calls_that_need_guest_memory_are_named_not_guessed() {
    let d = scratch("memory");
    let wat = d.join("reads.wat");
    std::fs::write(
        &wat,
        r#"(module
             (import "vmcall" "read_phys" (func $r (param i64 i32 i32) (result i32)))
             (memory (export "memory") 1)
             (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
               (drop (call $r (local.get 1) (i32.const 0) (i32.const 8)))
               (i64.load (i32.const 0))))"#,
    )
    .unwrap();
    let file = d.join("r.jsonl");
    record(&file, "emu", &format!("wasm:{}", wat.display()), "4");
    let o = vmcall(&["replay", file.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "nothing differs: {out}{err}");
    assert!(
        out.contains("needs guest memory: 4 calls (nr 0x14) not replayable without --guest"),
        "{out}"
    );
    assert!(out.contains("total: 4 calls, 0 same, 0 changed, 4 not replayed"), "{out}");
    // With the guest they are answered, and the same.
    let o =
        vmcall(&["replay", file.to_str().unwrap(), "--guest", guest("calls"), "--backend", "emu"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn stats_of_a_recording_is_the_stats_report() {
    let d = scratch("stats");
    let file = d.join("r.jsonl");
    let o = vmcall(&[
        "run",
        guest("hcloop"),
        "--backend",
        "emu",
        "--vcpus",
        "2",
        "--hypercall",
        "20=const:3",
        "--record",
        file.to_str().unwrap(),
        "--stats=vcpu",
        "--",
        "40",
        "20",
        "9",
        "quiet",
    ]);
    let (_, run_err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{run_err}");
    assert!(run_err.contains("vCPU 0:") && run_err.contains("vCPU 0  total"), "{run_err}");
    let o = vmcall(&["stats", file.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("40 hypercalls in"), "{out}");
    let head = out.lines().find(|l| l.trim_start().starts_with("nr")).unwrap();
    for col in ["calls", "calls%", "time%", "min(", "mean(", "median(", "p99(", "max("] {
        assert!(head.contains(col), "{col}: {head}");
    }
    let row: Vec<&str> = out
        .lines()
        .find(|l| l.trim_start().starts_with("0x14"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(&row[1..5], ["const:3", "40", "100.00", "100.00"], "{out}");
    assert!(out.lines().any(|l| l.trim_start().starts_with("total")), "{out}");
    // A bad file is an error, not a crash.
    let o = vmcall(&["stats", guest("calls")]);
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("not a vmcall recording"), "{:?}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn exec_handlers_replay_with_and_without_the_guest() {
    let d = scratch("exec");
    let file = d.join("r.jsonl");
    record(&file, "emu", "echo", "4");
    let f = file.to_str().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/handlers/double.py");
    let spec = format!("20=exec:python3 {script}");
    // double answers 2 * a0: the same as echo for a0 = 0 only.
    let o = vmcall(&["replay", f, "--hypercall", &spec]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("total: 4 calls, 1 same, 3 changed, 0 not replayed"), "{out}");
    let o =
        vmcall(&["replay", f, "--guest", guest("calls"), "--backend", "emu", "--hypercall", &spec]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("first divergence: vCPU 0, its call #1"), "{out}{err}");
    assert!(out.contains("-> 0x2 by exec:python3"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn record_to_stdout_and_handlers_that_cannot_be_rebuilt() {
    // `--record -`: stdout is the recording alone; the guest's console goes to stderr.
    let o = vmcall(&[
        "run",
        guest("calls"),
        "--backend",
        "emu",
        "--hypercall",
        "20=echo",
        "--record",
        "-",
        "--",
        "3",
        "20",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("calls n=3"), "the console is on stderr: {err}");
    let types: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON")["type"].to_string())
        .collect();
    assert_eq!(types, ["\"header\"", "\"call\"", "\"call\"", "\"call\"", "\"end\""], "{out}");
    let o = vmcall(&["run", guest("calls"), "--record", "-", "--trace-json", "-"]);
    assert_eq!(o.status.code(), Some(2), "a usage error: {:?}", text(&o));
    assert!(text(&o).1.contains("--record - needs stdout to itself"), "{:?}", text(&o));

    // A handler registered by library code has no spec to rebuild it from.
    let d = scratch("native");
    let native = out.replacen(
        "{\"nr\":\"0x14\",\"name\":\"echo\",\"kind\":\"echo\"",
        "{\"nr\":\"0x14\",\"name\":\"mine\",\"kind\":\"native\"",
        1,
    );
    assert_ne!(native, out);
    let file = d.join("native.jsonl");
    std::fs::write(&file, native).unwrap();
    let o = vmcall(&["replay", file.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("hypercall 0x14's recorded handler 'mine' (native) cannot be rebuilt")
            && err.contains("--hypercall 20=HANDLER"),
        "{err}"
    );
    let o = vmcall(&["replay", file.to_str().unwrap(), "--hypercall", "20=echo"]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let _ = std::fs::remove_dir_all(&d);
}

/// A recording that turns out to be malformed part-way stops the re-run there (nothing after
/// that line can be compared), and the error names the line.
#[test]
fn a_bad_line_stops_the_rerun_where_it_is_found() {
    let d = scratch("badline");
    let file = d.join("r.jsonl");
    record(&file, "emu", "echo", "30000");
    let recorded = std::fs::read_to_string(&file).unwrap();
    let mut lines: Vec<&str> = recorded.lines().collect();
    lines[5] = "{\"type\":\"call\",\"seq\":\"x\"}"; // line 6: the fifth call
    std::fs::write(&file, lines.join("\n")).unwrap();
    let f = file.to_str().unwrap();
    let o = vmcall(&[
        "replay",
        f,
        "--guest",
        guest("calls"),
        "--backend",
        "emu",
        "--hypercall",
        "20=echo",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(125), "{out}{err}");
    assert!(err.contains("line 6"), "{err}");
    assert!(!err.contains("calls n=30000"), "the guest ran to its end: {err}");
    let _ = std::fs::remove_dir_all(&d);
}
