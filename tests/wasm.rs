//! WebAssembly handlers answer hypercall 20 for a real guest (guests/src/bin/wasm.rs) on every
//! backend: the `.wat` handler (no toolchain needed) and the same handler written in C, built
//! here with clang --target=wasm32 and wasm-ld. State persists in the instance, guest memory is
//! read and written through the host API (physical and virtual), and a trap, an endless loop
//! and a memory grab each answer -KVM_EFAULT without disturbing the VM or the next call. A wasm
//! handler also follows guest-virtual pointers through a kernel-like guest's own page tables.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vmcall_conformance::{
    backends, check_run, kernel_table, run, virtptr_lines, visible, Outcome, Verdicts, HC_VIRT_SUM,
};
use vmcall_vmm::hypercall::wasm::{WasmConfig, WasmCounters, WasmHandler};
use vmcall_vmm::hypercall::{Call, HypercallHandler, HypercallTable};
use vmcall_vmm::vm::RunStatus;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// A smaller budget than the default 10M fuel: the endless loop ends sooner in a debug build,
/// whose interpreter is far slower than a release build's.
const FUEL: u64 = 2_000_000;

/// Calls the guest makes (with operation 5, the endless loop).
const CALLS: u64 = 13;

/// Run the `wasm` guest on every backend with the handler at `path`.
fn answers_on_every_backend(test: &str, path: &Path, first_log: &str) {
    for b in backends(test) {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let config = WasmConfig {
            fuel: FUEL,
            log_sink: Arc::new(move |l: &str| sink.lock().unwrap().push(l.to_string())),
            ..Default::default()
        };
        let h = Arc::new(WasmHandler::load_with(path, config).expect("load the handler"));
        let table = Arc::new(HypercallTable::new());
        let handler = h.clone();
        table.register(20, "wasm", move |c: &Call<'_>| handler.call(c)).unwrap();
        let out = run(b.hv.as_ref(), "wasm", "", table);
        out.expect_status(RunStatus::AllHalted, &b.name);
        check_console(&out, &b.name);
        assert_eq!(
            h.counters(),
            WasmCounters { calls: CALLS, traps: 1, out_of_fuel: 1, memory_limit: 1 },
            "{}",
            b.name
        );
        assert_eq!(out.stats.hypercalls[&20].count, CALLS, "{}", b.name);
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 1, "{}: {lines:?}", b.name);
        assert!(
            lines[0].starts_with("vmcall: wasm ")
                && lines[0].ends_with(&format!(": vCPU 0: {first_log}")),
            "{}: {lines:?}",
            b.name
        );
    }
}

fn check_console(out: &Outcome, backend: &str) {
    let want: u64 =
        b"The quick brown fox jumps over the lazy dog".iter().map(|b| u64::from(*b)).sum();
    let expected = [
        "wasm count=1,2,3".to_string(),
        format!("wasm phys sum={want} want={want}"),
        format!("wasm virt sum={want} want={want}"),
        "wasm wild phys=-14 virt=-14".into(),
        "wasm write ret=12 text=wasm says hi".into(),
        "wasm trap=-14".into(),
        "wasm spin=-14".into(),
        "wasm grow=-14".into(),
        "wasm unknown=-1000".into(),
        "wasm count after=4".into(),
    ];
    assert_eq!(out.lines("wasm "), expected, "{backend}:\n{}", out.console);
}

#[test]
fn a_wat_handler_answers_hypercall_20_on_every_backend() {
    answers_on_every_backend(
        "a_wat_handler_answers_hypercall_20_on_every_backend",
        &root().join("tests/wasm/handler.wat"),
        "handler.wat: first call",
    );
}

/// Build tests/wasm/handler.c to wasm32 with clang; `Err` says why it cannot be built here.
fn build_c_handler() -> Result<PathBuf, String> {
    for tool in ["clang", "wasm-ld"] {
        match Command::new(tool).arg("--version").output() {
            Ok(o) if o.status.success() => {}
            _ => return Err(format!("{tool} not found (scripts/install-deps.sh installs it)")),
        }
    }
    let dir = std::env::temp_dir().join(format!("vmcall-wasm-c-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let out = dir.join("handler.wasm");
    let o = Command::new("clang")
        .args([
            "--target=wasm32",
            "-O2",
            "-nostdlib",
            "-mbulk-memory",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg("-I")
        .arg(root().join("sdk/wasm/include"))
        .args(["-Wl,--no-entry", "-Wl,--export=vmcall_handle", "-o"])
        .arg(&out)
        .arg(root().join("tests/wasm/handler.c"))
        .output()
        .map_err(|e| e.to_string())?;
    // A compiler that is there but cannot build the handler is a failure, not a skip.
    assert!(o.status.success(), "clang failed:\n{}", String::from_utf8_lossy(&o.stderr));
    Ok(out)
}

#[test]
fn a_c_handler_built_with_clang_answers_hypercall_20_on_every_backend() {
    let test = "a_c_handler_built_with_clang_answers_hypercall_20_on_every_backend";
    let path = match build_c_handler() {
        Ok(p) => p,
        Err(why) if std::env::var_os("CI").is_none() => {
            visible(&format!("SKIP {test}: {why}"));
            return;
        }
        Err(why) => panic!("{test}: CI installs clang and lld, yet: {why}"),
    };
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"\0asm", "a binary module");
    answers_on_every_backend(test, &path, "handler.c: first call");
    std::fs::remove_dir_all(path.parent().unwrap()).ok();
}

/// The `.wat` handler with the test budget and its log discarded.
fn load_quiet(path: &Path) -> WasmHandler {
    let config = WasmConfig { fuel: FUEL, log_sink: Arc::new(|_: &str| {}), ..Default::default() };
    WasmHandler::load_with(path, config).unwrap()
}

#[test]
fn replacing_a_wasm_handler_while_the_guest_runs_starts_a_fresh_instance() {
    // The table swaps wasm handlers like any other (the control socket's `set 20=wasm:...`):
    // the new instance starts with its own, fresh state.
    let path = root().join("tests/wasm/handler.wat");
    for b in backends("replacing_a_wasm_handler_while_the_guest_runs_starts_a_fresh_instance") {
        let table = Arc::new(HypercallTable::new());
        let v1 = load_quiet(&path);
        // Loaded here: a vCPU thread, where handlers run, may open no file (seccomp).
        let v2 = std::sync::Mutex::new(Some(load_quiet(&path)));
        let swapped = Arc::new(AtomicBool::new(false));
        let (t, s) = (table.clone(), swapped.clone());
        // After v1 has counted to 2, swap in v2 (from inside the call: the table allows it).
        table
            .register(20, "v1", move |c: &Call<'_>| {
                let r = v1.call(c);
                if c.args[0] == 0 && r == Ok(2) && !s.swap(true, Ordering::SeqCst) {
                    let fresh = v2.lock().unwrap().take().expect("swapped once");
                    t.replace(20, "v2", fresh).unwrap();
                }
                r
            })
            .unwrap();
        let out = run(b.hv.as_ref(), "wasm", "nospin", table);
        out.expect_status(RunStatus::AllHalted, &b.name);
        assert!(swapped.load(Ordering::SeqCst), "{}", b.name);
        assert_eq!(
            out.lines("wasm count="),
            vec!["wasm count=1,2,1"],
            "{}:\n{}",
            b.name,
            out.console
        );
        assert_eq!(out.lines("wasm count after="), vec!["wasm count after=2"], "{}", b.name);
    }
}

/// Hypercall 0x30 of the kernel guests (`vmcall_conformance::virt_sum`) as a wasm handler: the
/// sum of a1 (at most 4096) bytes at guest-virtual a0, read with `read_virt`.
const VIRT_SUM_WAT: &str = r#"(module
  (import "vmcall" "read_virt" (func $read_virt (param i64 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "vmcall_handle")
        (param $nr i64) (param $va i64) (param $len i64) (param i64) (param i64) (param i32)
        (result i64)
    (local $n i32) (local $i i32) (local $r i32) (local $s i64)
    (local.set $n (i32.wrap_i64
      (select (local.get $len) (i64.const 4096) (i64.lt_u (local.get $len) (i64.const 4096)))))
    (local.set $r (call $read_virt (local.get $va) (i32.const 0) (local.get $n)))
    (if (local.get $r) (then (return (i64.extend_i32_s (local.get $r)))))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (local.set $s (i64.add (local.get $s) (i64.load8_u (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $s)))"#;

#[test]
fn a_wasm_handler_follows_guest_virtual_pointers_through_the_guests_own_tables() {
    // kernel_virt's virtptr case (tests/virt.rs) with the native handler of 0x30 replaced.
    let want = virtptr_lines();
    let mut verdicts = Verdicts::default();
    let case = "kernel_virt virtptr, wasm handler";
    for b in backends(case) {
        let table = kernel_table();
        let h =
            WasmHandler::from_bytes("virt-sum.wat", VIRT_SUM_WAT.as_bytes(), WasmConfig::default())
                .unwrap();
        table.replace(HC_VIRT_SUM, "virt-sum.wat", h).unwrap();
        let out = run(b.hv.as_ref(), "kernel_virt", "virtptr", table);
        let verdict = check_run(&out, &b, &want, &[(HC_VIRT_SUM, 5)]);
        verdicts.record(case, &b.name, verdict, &out.console);
    }
    verdicts.finish();
}
