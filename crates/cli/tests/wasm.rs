//! `--hypercall NR=wasm:PATH` as a user meets it: a .wat handler answers the wasm guest on the
//! software CPU, its log and failures reach stderr, and bad modules are refused up front.
#![cfg(feature = "wasm")]

use std::path::Path;

mod common;

use common::vmcall;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().parent().unwrap()
}

#[test]
fn a_wat_handler_answers_from_the_command_line() {
    let handler = root().join("tests/wasm/handler.wat");
    let spec = format!("20=wasm:{}", handler.display());
    let guest = vmcall_test_guests::path("wasm").expect("the wasm guest");
    // `nospin`: the endless loop would take the default budget, slow in a debug build.
    let o = vmcall(&[
        "run",
        guest,
        "--backend",
        "emu",
        "--hypercall",
        &spec,
        "--stats",
        "--",
        "nospin",
    ]);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}\n{err}");
    for line in [
        "wasm count=1,2,3",
        "wasm write ret=12 text=wasm says hi",
        "wasm trap=-14",
        "wasm grow=-14",
        "wasm count after=4",
    ] {
        assert!(out.lines().any(|l| l == line), "no '{line}' in:\n{out}");
    }
    assert!(err.contains("handler.wat: vCPU 0: handler.wat: first call"), "{err}");
    assert!(err.contains("wasm handler trapped: wasm `unreachable`"), "{err}");
    assert!(err.contains("wasm handler grew its memory past the cap"), "{err}");
    assert!(err.contains(&format!("wasm:{}", handler.display())), "stats name the handler:\n{err}");
}

#[test]
fn bad_wasm_handlers_are_refused_before_the_guest_runs() {
    let dir = std::env::temp_dir().join(format!("vmcall-cli-wasm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let cases = [
        ("/nonexistent/h.wasm".to_string(), "cannot read wasm handler '/nonexistent/h.wasm'"),
        (write("garbage.wasm", "garbage"), "is not a valid WebAssembly module"),
        (write("noexport.wat", "(module)"), "exports no function `vmcall_handle`"),
        (
            write(
                "import.wat",
                r#"(module (import "env" "f" (func)) (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64) (i64.const 0)))"#,
            ),
            "imports env.f (a function ()), which vmcall does not provide",
        ),
    ];
    for (path, want) in cases {
        let o = vmcall(&["run", "x", "--hypercall", &format!("20=wasm:{path}")]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{path}: {err}");
        assert!(err.contains(want), "{path}: no '{want}' in:\n{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bench_reports_the_wasm_handlers_cost_over_a_native_closure() {
    let json = std::env::temp_dir().join(format!("vmcall-bench-wasm-{}.json", std::process::id()));
    let o = vmcall(&[
        "bench",
        "--rounds",
        "1",
        "--calls",
        "20",
        "--emu-calls",
        "2000",
        "--json",
        json.to_str().unwrap(),
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    for key in [
        "wasm-kvm",
        "wasm-emu",
        "wasm handler over a native closure",
        "a wasm handler's extra cost",
    ] {
        assert!(out.contains(key), "no {key} in\n{out}");
    }
    // The software CPU runs everywhere, so its figures are always there.
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json);
    let emu = doc["wasm_over_native"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["backend"] == "emu")
        .unwrap()
        .clone();
    for key in ["native_ns", "wasm_ns", "extra_ns", "ratio"] {
        assert!(emu[key].is_number(), "{key} in {emu}");
    }
}
