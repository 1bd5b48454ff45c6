//! `exec:` handlers (the documented Python example, and processes that die, hang or answer
//! garbage) and the machine-readable output (`--stats-json`, `--trace-json`, `-` for stdout).

use serde_json::Value;

mod common;

use common::{text, vmcall};

fn hcloop() -> &'static str {
    vmcall_test_guests::path("hcloop").unwrap()
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/handlers/double.py");

/// The example in docs/hypercalls.md is the file the tests run, word for word.
#[test]
fn the_documented_python_handler_is_the_tested_one() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/hypercalls.md"))
            .unwrap();
    let script = std::fs::read_to_string(SCRIPT).unwrap();
    assert!(doc.contains(&script), "docs/hypercalls.md does not show examples/handlers/double.py");
    assert!(script.lines().count() <= 10, "the example is ten lines at most");
}

#[test]
fn a_python_exec_handler_answers_hypercall_20() {
    let spec = format!("20=exec:python3 {SCRIPT}");
    let o = vmcall(&[
        "run",
        hcloop(),
        "--backend",
        "emu",
        "--hypercall",
        &spec,
        "--",
        "200",
        "20",
        "21",
        "quiet",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("answers calls=200 42=200 other=0"), "{out}\n{err}");
}

#[test]
fn exec_handlers_that_fail_cost_the_guest_efault_and_are_reported() {
    for (spec, want, extra) in [
        ("20=exec:exit 3", "it exited (exit status: 3)", &[][..]),
        ("20=exec:sleep 5", "no answer within 100ms", &["--exec-deadline", "100ms"][..]),
        ("20=exec:while read -r l; do echo nonsense; done", "answered \"nonsense\"", &[][..]),
    ] {
        let mut args = vec!["run", hcloop(), "--backend", "emu", "--hypercall", spec];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "2", "20", "1", "quiet"]);
        let o = vmcall(&args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(0), "{spec}: {err}");
        assert!(out.contains("-14="), "{spec}: the guest sees -KVM_EFAULT: {out}");
        assert!(
            err.contains(want) && err.contains("the guest gets -KVM_EFAULT (-14)"),
            "{spec}: {err}"
        );
    }
}

#[test]
fn stats_and_trace_as_json_parse_back() {
    let dir = std::env::temp_dir().join(format!("vmcall-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (stats, trace) = (dir.join("stats.json"), dir.join("trace.jsonl"));
    let o = vmcall(&[
        "run",
        hcloop(),
        "--backend",
        "emu",
        "--vcpus",
        "2",
        "--hypercall",
        "20=const:3",
        "--stats-json",
        stats.to_str().unwrap(),
        "--trace-json",
        trace.to_str().unwrap(),
        "--",
        "50",
        "20",
        "9",
        "quiet",
    ]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(doc["vcpus"], 2);
    assert_eq!(doc["hypercalls_total"], 50);
    let n20 = &doc["hypercalls"][0];
    assert_eq!(
        (n20["nr"].as_u64(), n20["nr_hex"].as_str(), n20["count"].as_u64()),
        (Some(20), Some("0x14"), Some(50))
    );
    for key in ["min_ns", "mean_ns", "median_ns", "p99_ns", "max_ns"] {
        assert!(n20[key].as_u64().is_some(), "{key}: {n20}");
    }
    assert!(n20["min_ns"].as_u64() <= n20["median_ns"].as_u64());
    assert!(n20["p99_ns"].as_u64() <= n20["max_ns"].as_u64());
    assert_eq!(n20["handlers"], serde_json::json!([{"name": "const:3", "count": 50}]));
    assert_eq!(n20["vcpus"][0]["vcpu"], 0, "only vCPU 0 calls: {n20}");
    assert_eq!(n20["vcpus"].as_array().unwrap().len(), 1);
    let lines: Vec<Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 50);
    let first = &lines[0];
    assert_eq!((first["vcpu"].as_u64(), first["nr"].as_str()), (Some(0), Some("0x14")));
    assert_eq!(first["args"], serde_json::json!(["0x9", "0x0", "0x0", "0x0"]));
    assert_eq!((first["result"].as_i64(), first["cpl"].as_u64()), (Some(3), Some(0)));
    assert_eq!(
        (first["mode"].as_str(), first["handler"].as_str()),
        (Some("64-bit"), Some("const:3"))
    );
    assert!(first["rip"].as_str().unwrap().starts_with("0x") && first["latency_ns"].is_u64());

    // `-` is stdout, next to the guest's console.
    let o = vmcall(&[
        "run",
        hcloop(),
        "--backend",
        "emu",
        "--hypercall",
        "20=const:3",
        "--trace-json",
        "-",
        "--stats-json",
        "-",
        "--",
        "3",
        "20",
        "9",
        "quiet",
    ]);
    let (out, _) = text(&o);
    let traced = out.lines().filter(|l| l.starts_with("{\"vcpu\"")).count();
    assert_eq!(traced, 3, "{out}");
    let json_start = out.find("{\n").expect("the pretty stats document");
    let doc: Value = serde_json::from_str(&out[json_start..]).unwrap();
    assert_eq!(doc["hypercalls_total"], 3);
    let _ = std::fs::remove_dir_all(&dir);
}
