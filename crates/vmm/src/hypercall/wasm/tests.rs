//! Unit tests of wasm handlers: state, the host API and its bounds, failures and limits, load
//! errors. Modules are `.wat` text, so no wasm toolchain is needed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::memory::GuestRam;
use crate::x86::paging::PagingContext;
use crate::x86::CpuMode;

const RAM: u64 = 2 << 20;
const EFAULT: u64 = (-14i64) as u64;

/// The handler's signature, for modules written here.
const SIG: &str = "(param $nr i64) (param $a0 i64) (param $a1 i64) (param $a2 i64) (param $a3 i64) (param $vcpu i32) (result i64)";

/// A module whose `vmcall_handle` has body `body`, with `extra` before it.
fn module(extra: &str, body: &str) -> String {
    format!(
        r#"(module
  (import "vmcall" "read_phys" (func $read_phys (param i64 i32 i32) (result i32)))
  (import "vmcall" "write_phys" (func $write_phys (param i64 i32 i32) (result i32)))
  (import "vmcall" "read_virt" (func $read_virt (param i64 i32 i32) (result i32)))
  (import "vmcall" "write_virt" (func $write_virt (param i64 i32 i32) (result i32)))
  (import "vmcall" "log" (func $log (param i32 i32)))
  (import "vmcall" "now_ns" (func $now_ns (result i64)))
  (memory (export "memory") 1)
  (global $count (mut i64) (i64.const 0))
  {extra}
  (func (export "vmcall_handle") {SIG}
    {body}))"#
    )
}

fn handler(wat: &str) -> WasmHandler {
    handler_with(wat, WasmConfig::default())
}

fn handler_with(wat: &str, config: WasmConfig) -> WasmHandler {
    WasmHandler::from_bytes("test.wat", wat.as_bytes(), config).unwrap()
}

fn ram() -> GuestRam {
    GuestRam::new(RAM).unwrap()
}

fn call(h: &WasmHandler, mem: &GuestRam, nr: u64, args: [u64; 4]) -> u64 {
    let c =
        Call { nr, args, vcpu_id: 3, mode: CpuMode::Long64, mem, paging: PagingContext::default() };
    match h.call(&c) {
        Ok(v) => v,
        Err(e) => e.to_rax(),
    }
}

fn load_err(wat: &str) -> WasmError {
    WasmHandler::from_bytes("bad.wat", wat.as_bytes(), WasmConfig::default()).unwrap_err()
}

/// A log sink that keeps the lines.
fn capture() -> (LogSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l = lines.clone();
    (Arc::new(move |s: &str| l.lock().unwrap().push(s.to_string())), lines)
}

#[test]
fn arguments_reach_the_export_and_its_result_is_rax() {
    let h = handler(&module(
        "",
        "(i64.add (i64.add (i64.add (local.get $nr) (local.get $a0)) (i64.add (local.get $a1) (local.get $a2)))
              (i64.add (local.get $a3) (i64.extend_i32_u (local.get $vcpu))))",
    ));
    let mem = ram();
    assert_eq!(call(&h, &mem, 20, [1, 10, 100, 1000]), 20 + 1111 + 3);
    // Negative answers are the handler's own error codes.
    let neg = handler(&module("", "(i64.const -22)"));
    assert_eq!(call(&neg, &mem, 20, [0; 4]), (-22i64) as u64);
}

#[test]
fn state_persists_in_the_instance_between_calls() {
    let h = handler(&module(
        "",
        "(global.set $count (i64.add (global.get $count) (i64.const 1))) (global.get $count)",
    ));
    let mem = ram();
    for i in 1..=5 {
        assert_eq!(call(&h, &mem, 20, [0; 4]), i);
    }
    assert_eq!(h.counters(), WasmCounters { calls: 5, ..Default::default() });
}

#[test]
fn calls_from_many_threads_are_serialised() {
    let h = Arc::new(handler(&module(
        "",
        "(global.set $count (i64.add (global.get $count) (i64.const 1))) (global.get $count)",
    )));
    let mem = Arc::new(ram());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (h, mem) = (h.clone(), mem.clone());
            std::thread::spawn(move || {
                (0..1000).map(|_| call(&h, &mem, 20, [0; 4])).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    all.sort_unstable();
    // Each call saw its own increment: every count from 1 to 4000 exactly once.
    assert_eq!(all, (1..=4000).collect::<Vec<_>>());
}

/// Reads 8 bytes at guest-physical a0, writes them + 1 at a0 + 8; answers the value read, or
/// the host API's error.
const PHYS_RW: &str = "(local $r i32)
    (local.set $r (call $read_phys (local.get $a0) (i32.const 0) (i32.const 8)))
    (if (i32.ne (local.get $r) (i32.const 0)) (then (return (i64.extend_i32_s (local.get $r)))))
    (i64.store (i32.const 8) (i64.add (i64.load (i32.const 0)) (i64.const 1)))
    (local.set $r (call $write_phys (i64.add (local.get $a0) (i64.const 8)) (i32.const 8) (i32.const 8)))
    (if (i32.ne (local.get $r) (i32.const 0)) (then (return (i64.extend_i32_s (local.get $r)))))
    (i64.load (i32.const 0))";

#[test]
fn host_api_reads_and_writes_guest_physical_memory_bounds_checked() {
    let h = handler(&module("", PHYS_RW));
    let mem = ram();
    mem.write_u64(0x1000, 0x1234).unwrap();
    assert_eq!(call(&h, &mem, 20, [0x1000, 0, 0, 0]), 0x1234);
    assert_eq!(mem.read_u64(0x1008).unwrap(), 0x1235);
    // Outside RAM, straddling its end, and an address that wraps: -KVM_EFAULT, nothing written.
    for gpa in [RAM, RAM - 4, u64::MAX - 3, 1 << 63] {
        assert_eq!(call(&h, &mem, 20, [gpa, 0, 0, 0]), EFAULT, "gpa {gpa:#x}");
    }
    // The write half alone out of RAM: the read succeeds, the write is refused.
    assert_eq!(call(&h, &mem, 20, [RAM - 8, 0, 0, 0]), EFAULT);
    assert_eq!(h.counters().failures(), 0, "guest faults are answers, not handler failures");
}

#[test]
fn host_api_reads_and_writes_guest_virtual_memory() {
    // Paging off (the default context): virtual = physical, limited to 32 bits.
    let h = handler(&module(
        "",
        "(local $r i32)
        (local.set $r (call $read_virt (local.get $a0) (i32.const 0) (i32.wrap_i64 (local.get $a1))))
        (if (i32.ne (local.get $r) (i32.const 0)) (then (return (i64.extend_i32_s (local.get $r)))))
        (local.set $r (call $write_virt (local.get $a2) (i32.const 0) (i32.wrap_i64 (local.get $a1))))
        (if (i32.ne (local.get $r) (i32.const 0)) (then (return (i64.extend_i32_s (local.get $r)))))
        (i64.load (i32.const 0))",
    ));
    let mem = ram();
    mem.write(0x2ffc, b"abcdefgh").unwrap();
    // Across a page boundary.
    assert_eq!(call(&h, &mem, 20, [0x2ffc, 8, 0x5000, 0]), u64::from_le_bytes(*b"abcdefgh"));
    let mut back = [0u8; 8];
    mem.read(0x5000, &mut back).unwrap();
    assert_eq!(&back, b"abcdefgh");
    // Beyond RAM, reading or writing.
    assert_eq!(call(&h, &mem, 20, [RAM, 8, 0x5000, 0]), EFAULT);
    assert_eq!(call(&h, &mem, 20, [0x2ffc, 8, RAM - 4, 0]), EFAULT);
    assert_eq!(mem.read_u64(RAM - 8).unwrap(), 0, "a refused write writes nothing");
}

#[test]
fn a_buffer_outside_the_handlers_memory_traps_and_the_instance_goes_on() {
    let h = handler(&module(
        "",
        "(global.set $count (i64.add (global.get $count) (i64.const 1)))
        (drop (call $read_phys (i64.const 0) (i32.wrap_i64 (local.get $a0)) (i32.const 16)))
        (global.get $count)",
    ));
    let mem = ram();
    assert_eq!(call(&h, &mem, 20, [0, 0, 0, 0]), 1);
    // One page of linear memory: 65536 - 8 + 16 runs off its end; so does a negative length.
    assert_eq!(call(&h, &mem, 20, [65536 - 8, 0, 0, 0]), EFAULT);
    assert_eq!(call(&h, &mem, 20, [0xffff_fff8, 0, 0, 0]), EFAULT);
    assert_eq!(h.counters().traps, 2);
    // The instance kept what the failed calls did before they trapped (the counter went up).
    assert_eq!(call(&h, &mem, 20, [0, 0, 0, 0]), 4);
}

#[test]
fn host_copies_without_an_exported_memory_trap() {
    let h = handler(
        r#"(module
  (import "vmcall" "read_phys" (func $read_phys (param i64 i32 i32) (result i32)))
  (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
    (i64.extend_i32_s (call $read_phys (i64.const 0) (i32.const 0) (i32.const 8)))))"#,
    );
    let mem = ram();
    assert_eq!(call(&h, &mem, 20, [0; 4]), EFAULT);
    assert_eq!(h.counters().traps, 1);
}

#[test]
fn traps_answer_efault_and_the_instance_stays_usable() {
    let h = handler(&module(
        "",
        "(global.set $count (i64.add (global.get $count) (i64.const 1)))
        (if (i64.eq (local.get $a0) (i64.const 1)) (then unreachable))
        (if (i64.eq (local.get $a0) (i64.const 2)) (then (drop (i64.div_u (i64.const 1) (i64.const 0)))))
        (if (i64.eq (local.get $a0) (i64.const 3)) (then (drop (i64.load (i32.const 0x7ffffff0)))))
        (global.get $count)",
    ));
    let mem = ram();
    assert_eq!(call(&h, &mem, 20, [0; 4]), 1);
    for kind in 1..=3 {
        assert_eq!(call(&h, &mem, 20, [kind, 0, 0, 0]), EFAULT, "trap kind {kind}");
    }
    assert_eq!(call(&h, &mem, 20, [0; 4]), 5);
    assert_eq!(
        h.counters(),
        WasmCounters { calls: 5, traps: 3, ..Default::default() },
        "{:?}",
        h.counters()
    );
}

#[test]
fn the_time_budget_stops_an_endless_loop() {
    // 1M fuel: a debug build's interpreter is ~50x slower than a release build's.
    let h = handler_with(
        &module(
            "",
            "(if (i64.eq (local.get $a0) (i64.const 1)) (then (loop $l (br $l))))
            (global.set $count (i64.add (global.get $count) (i64.const 1)))
            (global.get $count)",
        ),
        WasmConfig { fuel: 1_000_000, ..Default::default() },
    );
    let mem = ram();
    let start = Instant::now();
    assert_eq!(call(&h, &mem, 20, [1, 0, 0, 0]), EFAULT);
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "1M fuel took {took:?}");
    assert_eq!(h.counters().out_of_fuel, 1);
    // The next call gets a fresh budget.
    assert_eq!(call(&h, &mem, 20, [0; 4]), 1);
    assert_eq!(call(&h, &mem, 20, [1, 0, 0, 0]), EFAULT);
    assert_eq!(h.counters().out_of_fuel, 2);
}

#[test]
fn the_budget_is_per_call_and_configurable() {
    // A loop of a0 iterations: fits 10M fuel at 1000, not at a small budget.
    let body = "(local $i i64)
        (local.set $i (local.get $a0))
        (block $done (loop $l
          (br_if $done (i64.eqz (local.get $i)))
          (local.set $i (i64.sub (local.get $i) (i64.const 1)))
          (br $l)))
        (i64.const 7)";
    let mem = ram();
    let roomy = handler(&module("", body));
    assert_eq!(call(&roomy, &mem, 20, [1000, 0, 0, 0]), 7);
    let tight = handler_with(&module("", body), WasmConfig { fuel: 500, ..Default::default() });
    assert_eq!(call(&tight, &mem, 20, [10, 0, 0, 0]), 7);
    assert_eq!(call(&tight, &mem, 20, [1000, 0, 0, 0]), EFAULT);
    assert_eq!(tight.counters().out_of_fuel, 1);
}

#[test]
fn host_copies_are_charged_fuel() {
    // 1000 reads of 64 KiB at 1 + 8192 fuel each: over a 1M budget.
    let h = handler_with(
        &module(
            "",
            "(local $i i32)
            (local.set $i (i32.const 1000))
            (loop $l
              (drop (call $read_phys (i64.const 0) (i32.const 0) (i32.const 65536)))
              (local.set $i (i32.sub (local.get $i) (i32.const 1)))
              (br_if $l (local.get $i)))
            (i64.const 0)",
        ),
        WasmConfig { fuel: 1_000_000, ..Default::default() },
    );
    let mem = ram();
    assert_eq!(call(&h, &mem, 20, [0; 4]), EFAULT);
    assert_eq!(h.counters().out_of_fuel, 1);
    assert_eq!(host::pages_for_test(0xfff, 2), 2);
    assert_eq!(host::pages_for_test(0x1000, 4096), 1);
    assert_eq!(host::pages_for_test(0x1000, 0), 0);
}

#[test]
fn growing_memory_past_the_cap_fails_the_call() {
    let h = handler_with(
        &module("", "(i64.extend_i32_s (memory.grow (i32.wrap_i64 (local.get $a0))))"),
        WasmConfig { memory_limit: 4 << 16, ..Default::default() },
    );
    let mem = ram();
    // 1 page + 3 = the 4-page cap: allowed, memory.grow answers the old size.
    assert_eq!(call(&h, &mem, 20, [3, 0, 0, 0]), 1);
    assert_eq!(call(&h, &mem, 20, [1, 0, 0, 0]), EFAULT);
    assert_eq!(h.counters().memory_limit, 1, "{:?}", h.counters());
    assert_eq!(call(&h, &mem, 20, [0, 0, 0, 0]), 4, "still 4 pages, still usable");
}

#[test]
fn a_module_needing_more_memory_than_the_cap_does_not_load() {
    let wat = r#"(module (memory 300)
        (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64) (i64.const 0)))"#;
    let err = load_err(wat);
    assert!(matches!(err, WasmError::Instantiate { .. }), "{err}");
    assert!(err.to_string().contains("16777216-byte cap"), "{err}");
}

#[test]
fn log_lines_are_prefixed_cut_escaped_and_rate_limited() {
    let (sink, lines) = capture();
    let h = handler_with(
        &module(
            r#"(data (i32.const 16) "hello\07 wasm\n")"#,
            "(call $log (i32.const 16) (i32.wrap_i64 (local.get $a0))) (i64.const 0)",
        ),
        WasmConfig { log_lines_per_sec: 3, log_sink: sink, ..Default::default() },
    );
    let mem = ram();
    call(&h, &mem, 20, [12, 0, 0, 0]);
    assert_eq!(lines.lock().unwrap()[0], "vmcall: wasm test.wat: vCPU 3: hello\\u{7} wasm");
    // Longer than LOG_LINE_MAX (reads zeros past the text): cut.
    call(&h, &mem, 20, [60_000, 0, 0, 0]);
    assert!(lines.lock().unwrap()[1].ends_with(" [cut]"));
    assert!(lines.lock().unwrap()[1].len() < LOG_LINE_MAX + 100);
    for _ in 0..20 {
        call(&h, &mem, 20, [5, 0, 0, 0]);
    }
    assert_eq!(lines.lock().unwrap().len(), 3, "a burst of 3 lines, then dropped");
    std::thread::sleep(Duration::from_millis(400));
    call(&h, &mem, 20, [5, 0, 0, 0]);
    let last = lines.lock().unwrap().last().unwrap().clone();
    assert_eq!(
        last,
        "vmcall: wasm test.wat: vCPU 3: hello (19 earlier lines dropped: over 3 lines/s)"
    );
    assert_eq!(h.counters().failures(), 0);
}

#[test]
fn now_ns_is_the_wall_clock() {
    let h = handler(&module("", "(call $now_ns)"));
    let mem = ram();
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let t = call(&h, &mem, 20, [0; 4]);
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    assert!((before..=after).contains(&t), "{before} <= {t} <= {after}");
}

#[test]
fn the_start_function_runs_once_at_load_without_a_guest() {
    let h = handler(&module(
        "(func $init
           (global.set $count (i64.extend_i32_s (call $read_phys (i64.const 0) (i32.const 0) (i32.const 8)))))
         (start $init)",
        "(global.get $count)",
    ));
    assert_eq!(call(&h, &ram(), 20, [0; 4]), EFAULT, "no guest at load: read_phys said -14");
    assert_eq!(h.counters().failures(), 0);
    let err = load_err(&module("(func $init unreachable) (start $init)", "(i64.const 0)"));
    assert!(matches!(err, WasmError::Instantiate { .. }), "{err}");
    let err = WasmHandler::from_bytes(
        "spin.wat",
        module("(func $init (loop $l (br $l))) (start $init)", "(i64.const 0)").as_bytes(),
        WasmConfig { fuel: 100_000, ..Default::default() },
    )
    .unwrap_err();
    assert!(matches!(err, WasmError::Instantiate { .. }), "{err}");
}

#[test]
fn load_errors_are_clear() {
    let missing = WasmHandler::load("/nonexistent/handler.wasm").unwrap_err();
    assert!(matches!(missing, WasmError::Read { .. }));
    assert!(missing.to_string().contains("/nonexistent/handler.wasm"), "{missing}");

    let garbage = WasmHandler::from_bytes("x", b"\0asm\x01\0\0\0garbage", WasmConfig::default());
    assert!(matches!(garbage, Err(WasmError::Invalid { .. })));
    assert!(matches!(load_err("(module (func"), WasmError::Invalid { .. }));
    // Invalid code: a type error the validator catches at load.
    let bad = r#"(module (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
        (i32.const 0)))"#;
    assert!(matches!(load_err(bad), WasmError::Invalid { .. }), "{}", load_err(bad));

    let err = load_err(r#"(module (func (export "handle") (result i64) (i64.const 0)))"#);
    assert!(matches!(err, WasmError::MissingExport { .. }), "{err}");
    assert!(err.to_string().contains("vmcall_handle"), "{err}");

    let err = load_err(
        r#"(module (func (export "vmcall_handle") (param i64 i64) (result i64) (i64.const 0)))"#,
    );
    assert!(matches!(err, WasmError::WrongSignature { .. }), "{err}");
    assert!(err.to_string().contains("a function (i64, i64) -> i64"), "{err}");
    let err = load_err(r#"(module (global (export "vmcall_handle") i64 (i64.const 0)))"#);
    assert!(err.to_string().contains("as a global"), "{err}");

    let err = load_err(
        r#"(module (import "env" "abort" (func))
           (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64) (i64.const 0)))"#,
    );
    assert!(matches!(err, WasmError::UnknownImport { .. }), "{err}");
    assert!(
        err.to_string().contains("env.abort") && err.to_string().contains("read_phys"),
        "{err}"
    );
    let err = load_err(
        r#"(module (import "vmcall" "read_phys" (func (param i32 i32 i32) (result i32)))
           (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64) (i64.const 0)))"#,
    );
    assert!(matches!(err, WasmError::ImportSignature { .. }), "{err}");
    assert!(err.to_string().contains("(i64, i32, i32) -> i32"), "{err}");
}

#[test]
fn every_host_function_links_with_its_documented_type() {
    // A module importing all of HOST_API with the listed types loads, so the list is the truth.
    let imports: String = HOST_API
        .iter()
        .map(|f| {
            let list = |l: &[ValType]| l.iter().map(|t| type_name(t)).collect::<Vec<_>>().join(" ");
            format!(
                r#"(import "vmcall" "{}" (func (param {}) (result {})))"#,
                f.name,
                list(f.params),
                list(f.results)
            )
        })
        .collect();
    let wat = format!(
        r#"(module {imports} (memory (export "memory") 1)
        (func (export "vmcall_handle") {SIG} (i64.const 0)))"#
    );
    handler(&wat);
}

#[test]
fn binary_and_text_modules_load_from_files() {
    let dir = std::env::temp_dir().join(format!("vmcall-wasm-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = module("", "(i64.const 42)");
    let binary = wat::parse_str(&text).unwrap();
    assert_eq!(&binary[..4], b"\0asm");
    for (file, bytes) in [("h.wat", text.as_bytes()), ("h.wasm", &binary[..])] {
        let path = dir.join(file);
        std::fs::write(&path, bytes).unwrap();
        let h = WasmHandler::load(&path).unwrap();
        assert_eq!(h.name(), path.display().to_string());
        assert_eq!(call(&h, &ram(), 20, [0; 4]), 42, "{file}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
