//! `vmcall bench`: what a hypercall costs through each path, against the baselines that matter,
//! measured in one run with the measurements interleaved (round-robin, `--rounds` times) so
//! that machine noise hits all alike. See docs/bench.md for what each line measures.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::hypercall::Call;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::stats::Latency;
use vmcall_vmm::vm::{prepare_guest, RunStatus, Vm, VmBuilder};

use crate::BenchArgs;

mod density;
mod live;
mod report;
use report::{json, missed, render};

/// The custom hypercall every vmcall path makes; its handler answers 0.
const BENCH_NR: u64 = 20;
const RAM: u64 = 4 << 20;
/// Calls per run through an exec: handler, and control-socket swaps per round.
const EXEC_CALLS: u64 = 2000;
const SWAPS: u32 = 20;
/// How long the in-kernel VMCALL baseline may take before it is declared hung.
#[cfg(feature = "kvm")]
const KERNEL_LIMIT: Duration = Duration::from_secs(2);
const BATCH_SIZES: [u64; 4] = [1, 8, 64, 512];

/// One measured path.
#[derive(Debug, Default)]
struct Series {
    key: String,
    what: String,
    lat: Latency,
    /// Set when only a mean per call can be measured (the kernel's own path).
    mean_ns: Option<f64>,
    /// Calls per round trip (batch size) — the figures are per call.
    per: u64,
    unavailable: Option<String>,
}

impl Series {
    fn new(key: &str, what: &str) -> Self {
        Self { key: key.into(), what: what.into(), per: 1, ..Default::default() }
    }
    /// Run one measurement into this series; a failure marks it unavailable, with the reason.
    fn measure(&mut self, f: impl FnOnce(&mut Latency) -> Result<(), String>) {
        if let Err(why) = f(&mut self.lat) {
            self.unavailable.get_or_insert(why);
        }
    }

    fn median(&self) -> Option<f64> {
        if self.unavailable.is_some() {
            return None;
        }
        self.mean_ns.or_else(|| {
            (self.lat.count > 0).then(|| self.lat.quantile_ns(0.5) as f64 / self.per as f64)
        })
    }
    fn p99(&self) -> Option<f64> {
        (self.unavailable.is_none() && self.mean_ns.is_none() && self.lat.count > 0)
            .then(|| self.lat.quantile_ns(0.99) as f64 / self.per as f64)
    }
}

fn image() -> &'static [u8] {
    crate::builtin::BENCH
}

/// The table every vmcall path uses: a native closure answering 0.
fn table() -> Arc<HypercallTable> {
    let t = Arc::new(HypercallTable::new());
    t.register(BENCH_NR, "bench", |_: &Call<'_>| Ok(0)).expect("empty table");
    t
}

/// The wasm handler of the `wasm-*` lines: it counts its calls in a global and answers 0,
/// the same answer as [`table`]'s closure.
#[cfg(feature = "wasm")]
const WASM_HANDLER: &str = r#"(module
  (global $calls (mut i64) (i64.const 0))
  (func (export "vmcall_handle") (param i64 i64 i64 i64 i64 i32) (result i64)
    (global.set $calls (i64.add (global.get $calls) (i64.const 1)))
    (i64.const 0)))"#;

/// A table with [`WASM_HANDLER`] for the bench number (a fresh instance each run).
#[cfg(feature = "wasm")]
fn wasm_table() -> Result<Arc<HypercallTable>, String> {
    use vmcall_vmm::hypercall::wasm::{WasmConfig, WasmHandler};
    let h = WasmHandler::from_bytes("bench.wat", WASM_HANDLER.as_bytes(), WasmConfig::default())
        .map_err(|e| crate::chain(&e))?;
    let t = Arc::new(HypercallTable::new());
    t.register(BENCH_NR, "wasm", h).expect("empty table");
    Ok(t)
}

#[cfg(not(feature = "wasm"))]
fn wasm_table() -> Result<Arc<HypercallTable>, String> {
    Err("built without the wasm feature".into())
}

/// A VM for `image` with `cmdline` and `table` on `hv`, its console discarded, its vCPU
/// threads confined as `vmcall run` confines them (the library's default filters).
fn bench_vm(
    hv: &dyn Hypervisor,
    image: Vec<u8>,
    cmdline: &str,
    table: Arc<HypercallTable>,
) -> Result<Vm, String> {
    bench_vm_builder(image, cmdline, table).build(hv).map_err(|e| crate::chain(&e))
}

/// The builder behind [`bench_vm`], for lines that need more (a sink, other filters).
fn bench_vm_builder(image: Vec<u8>, cmdline: &str, table: Arc<HypercallTable>) -> VmBuilder {
    VmBuilder::new(image)
        .memory(RAM)
        .cmdline(cmdline)
        .table(table)
        .timeout(Some(Duration::from_secs(120)))
        .console(Box::new(std::io::sink()))
}

/// Run the bench guest with `cmdline` on `hv`; its round trips go into `lat`.
fn vmcall_run(hv: &dyn Hypervisor, cmdline: &str, lat: &mut Latency) -> Result<(), String> {
    vmcall_run_with(hv, cmdline, table(), lat)
}

/// The same with the handlers of `table`.
fn vmcall_run_with(
    hv: &dyn Hypervisor,
    cmdline: &str,
    table: Arc<HypercallTable>,
    lat: &mut Latency,
) -> Result<(), String> {
    let report = bench_vm(hv, image().to_vec(), cmdline, table)?.run();
    match report.result {
        Ok(RunStatus::Exited(0)) => {
            lat.merge(&report.stats.round_trip);
            Ok(())
        }
        other => Err(format!("bench guest ended with {other:?}")),
    }
}

/// Everything a run measures, in the order of docs/bench.md.
struct Bench {
    series: Vec<Series>,
    cold: Vec<Series>,
    memory: Vec<(String, Result<f64, String>)>,
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    if let Some(spec) = &args.density_step {
        return density::step(spec);
    }
    if let Some(n) = args.density {
        return density::run(n, args);
    }
    let kvm = kvm_backends();
    let emu = crate::backends::emu();
    let mut bench = Bench { series: Vec::new(), cold: Vec::new(), memory: Vec::new() };
    let n = args.calls;
    let ne = args.emu_calls;

    // Line 1: the kernel's own VMCALL path (probe first: on some KVMs it never returns).
    let mut kernel =
        Series::new("kernel", "VMCALL answered inside the host kernel (unknown nr, -1000)");
    match &kvm {
        Err(why) => kernel.unavailable = Some(why.clone()),
        Ok(_) => match kernel_mean(10) {
            Ok(_) => {}
            Err(why) => kernel.unavailable = Some(why),
        },
    }
    let mut bare = Series::new(
        "bare-exit",
        "bare user-space exit: guest `out` loop, host loop does only KVM_RUN",
    );
    if let Err(why) = &kvm {
        bare.unavailable = Some(why.clone());
    }
    let mut kvm_series: Vec<Series> = match &kvm {
        Ok(list) => list
            .iter()
            .map(|(name, _)| {
                Series::new(&format!("vmcall-{name}"), &format!("vmcall custom hypercall, {name}"))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    let mut emu_raw = Series::new(
        "emu-raw",
        "raw unicorn loop: invalid-instruction hook answers VMCALL, nothing else",
    );
    let mut emu_vmcall = Series::new("vmcall-emu", "vmcall custom hypercall, software CPU");
    // The same custom hypercall answered by a wasm handler instead of the native closure.
    let mut wasm_kvm = Series::new("wasm-kvm", "the same, answered by a wasm handler, kvm/rewrite");
    let mut wasm_emu =
        Series::new("wasm-emu", "the same, answered by a wasm handler, software CPU");
    if let Err(why) = &kvm {
        wasm_kvm.unavailable = Some(why.clone());
    }
    let mut batches: Vec<(Series, Series)> = BATCH_SIZES
        .iter()
        .map(|s| {
            let mut k = Series::new(
                &format!("batch{s}-kvm"),
                &format!("batched, {s} calls per hypercall, kvm"),
            );
            let mut e = Series::new(
                &format!("batch{s}-emu"),
                &format!("batched, {s} calls per hypercall, emu"),
            );
            k.per = *s;
            e.per = *s;
            (k, e)
        })
        .collect();
    if let Err(why) = &emu {
        emu_raw.unavailable = Some(why.clone());
        emu_vmcall.unavailable = Some(why.clone());
        wasm_emu.unavailable = Some(why.clone());
    }
    let mut live_series: Vec<Series> = ["kvm", "emu"]
        .iter()
        .flat_map(|b| {
            [
                Series::new(
                    &format!("exec-{b}"),
                    &format!("exec: handler round trip (examples/handlers/double.py), {b}"),
                ),
                Series::new(
                    &format!("ctl-set-{b}"),
                    &format!("control socket `set` to the first call the new handler answers, {b}"),
                ),
            ]
        })
        .collect();
    let python = live::python_handler();
    for s in &mut live_series {
        let backend_down =
            if s.key.ends_with("kvm") { kvm.as_ref().err() } else { emu.as_ref().err() };
        if let Some(why) = backend_down {
            s.unavailable = Some(why.clone());
        } else if let (true, Err(why)) = (s.key.starts_with("exec"), &python) {
            s.unavailable = Some(why.clone());
        }
    }

    eprintln!("vmcall bench: {} rounds; {n} calls per KVM run, {ne} per emulator run", args.rounds);
    for round in 0..args.rounds {
        eprint!("  round {}/{}\r", round + 1, args.rounds);
        if let Ok(list) = &kvm {
            if kernel.unavailable.is_none() {
                match kernel_mean(n) {
                    Ok(mean) => {
                        let prev = kernel.mean_ns.unwrap_or(mean);
                        kernel.mean_ns = Some((prev * round as f64 + mean) / (round as f64 + 1.0));
                    }
                    Err(why) => kernel.unavailable = Some(why),
                }
            }
            bare.measure(|lat| raw_out(n, lat));
            for ((_, hv), s) in list.iter().zip(kvm_series.iter_mut()) {
                s.measure(|lat| vmcall_run(hv.as_ref(), &format!("hc {n} {BENCH_NR}"), lat));
            }
            let rewrite = &list[0].1;
            live_round(&mut live_series[..2], rewrite.as_ref(), &python, n.min(EXEC_CALLS));
            wasm_kvm.measure(|lat| {
                vmcall_run_with(rewrite.as_ref(), &format!("hc {n} {BENCH_NR}"), wasm_table()?, lat)
            });
            for (size, (k, _)) in BATCH_SIZES.iter().zip(batches.iter_mut()) {
                let calls = (n / size).max(20);
                k.measure(|lat| {
                    vmcall_run(rewrite.as_ref(), &format!("batch {calls} {size} {BENCH_NR}"), lat)
                });
            }
        }
        if let Ok(hv) = &emu {
            emu_raw.measure(|lat| emu_raw_loop(ne, lat));
            emu_vmcall.measure(|lat| vmcall_run(hv.as_ref(), &format!("hc {ne} {BENCH_NR}"), lat));
            live_round(&mut live_series[2..], hv.as_ref(), &python, ne.min(EXEC_CALLS));
            wasm_emu.measure(|lat| {
                vmcall_run_with(hv.as_ref(), &format!("hc {ne} {BENCH_NR}"), wasm_table()?, lat)
            });
            for (size, (_, e)) in BATCH_SIZES.iter().zip(batches.iter_mut()) {
                let calls = (ne / size).max(20);
                e.measure(|lat| {
                    vmcall_run(hv.as_ref(), &format!("batch {calls} {size} {BENCH_NR}"), lat)
                });
            }
        }
    }
    eprintln!();
    if kvm.is_err() {
        for (k, _) in &mut batches {
            k.unavailable = kvm.as_ref().err().cloned();
        }
    }
    if emu.is_err() {
        for (_, e) in &mut batches {
            e.unavailable = emu.as_ref().err().cloned();
        }
    }
    bench.series.push(kernel);
    bench.series.push(bare);
    bench.series.extend(kvm_series);
    bench.series.push(wasm_kvm);
    bench.series.push(emu_raw);
    bench.series.push(emu_vmcall);
    bench.series.push(wasm_emu);
    for (k, e) in batches {
        bench.series.push(k);
        bench.series.push(e);
    }
    bench.series.extend(live_series);
    if let Ok((script, _)) = &python {
        let _ = std::fs::remove_file(script);
    }

    cold_start(&mut bench, &kvm, &emu, args.rounds.max(10));
    memory(&mut bench, &kvm, &emu);

    let report = render(&bench);
    let json_to_stdout = args.json.as_deref() == Some(std::path::Path::new("-"));
    // With `--json -` stdout carries the JSON alone, and the table goes to stderr.
    if json_to_stdout {
        eprint!("{report}");
    } else {
        print!("{report}");
    }
    if let Some(path) = &args.json {
        crate::report::write_to(path, &json(&bench)).map_err(|e| crate::chain(&e))?;
        if !json_to_stdout {
            crate::note!("vmcall bench: wrote {}", path.display());
        }
    }
    let missed = missed(&bench);
    if args.check && !missed.is_empty() {
        return Err(format!("{} target(s) missed: {}", missed.len(), missed.join("; ")));
    }
    Ok(())
}

/// One round of the live-handler lines of one backend: `[exec-B, ctl-set-B]`.
fn live_round(
    series: &mut [Series],
    hv: &dyn Hypervisor,
    python: &Result<(std::path::PathBuf, String), String>,
    calls: u64,
) {
    if let (Ok((_, cmd)), true) = (python, series[0].unavailable.is_none()) {
        series[0].measure(|lat| live::exec_run(hv, cmd, calls, lat));
    }
    if series[1].unavailable.is_none() {
        series[1].measure(|lat| live::ctl_set(hv, SWAPS, lat));
    }
}

type Backends = Result<Vec<(String, Box<dyn Hypervisor>)>, String>;

/// KVM with every trap strategy, or why not.
fn kvm_backends() -> Backends {
    ["rewrite", "ud", "hwbp"]
        .into_iter()
        .map(|trap| crate::backends::kvm(trap).map(|hv| (format!("kvm/{trap}"), hv)))
        .collect()
}

/// Mean cost of one VMCALL the host kernel answers itself (line 1).
#[cfg(feature = "kvm")]
fn kernel_mean(n: u64) -> Result<f64, String> {
    let g = prepare_guest(image(), RAM, 1, format!("kernel {n}").as_bytes(), &Default::default())
        .map_err(|e| crate::chain(&e))?;
    let mut vm =
        vmcall_kvm::baseline::RawVm::new(g.ram, &g.inits[0], true).map_err(|e| e.to_string())?;
    match vm.run_to_exit(KERNEL_LIMIT).map_err(|e| e.to_string())? {
        Some(t) => Ok(t.as_nanos() as f64 / n as f64),
        None => Err(format!(
            "KVM_RUN did not return within {KERNEL_LIMIT:?} — this kernel's own VMCALL path hangs (kvm_pvm)"
        )),
    }
}

#[cfg(not(feature = "kvm"))]
fn kernel_mean(_: u64) -> Result<f64, String> {
    Err("built without the kvm feature".into())
}

/// Line 2: a raw KVM loop over the `out` guest (the same instructions as the hypercall loop).
#[cfg(feature = "kvm")]
fn raw_out(n: u64, lat: &mut Latency) -> Result<(), String> {
    let g = prepare_guest(
        image(),
        RAM,
        1,
        format!("out {n} {BENCH_NR}").as_bytes(),
        &Default::default(),
    )
    .map_err(|e| crate::chain(&e))?;
    let mut vm =
        vmcall_kvm::baseline::RawVm::new(g.ram, &g.inits[0], false).map_err(|e| e.to_string())?;
    vm.out_round_trips(0x80, lat).map_err(|e| e.to_string())
}

#[cfg(not(feature = "kvm"))]
fn raw_out(_: u64, _: &mut Latency) -> Result<(), String> {
    Err("built without the kvm feature".into())
}

/// The raw unicorn baseline of line 4, over the hypercall loop.
#[cfg(feature = "emu")]
fn emu_raw_loop(n: u64, lat: &mut Latency) -> Result<(), String> {
    let g = prepare_guest(
        image(),
        RAM,
        1,
        format!("hc {n} {BENCH_NR}").as_bytes(),
        &Default::default(),
    )
    .map_err(|e| crate::chain(&e))?;
    vmcall_emu::baseline::raw_hypercall_round_trips(&g.ram, &g.inits[0], lat)
        .map_err(|e| e.to_string())
}

#[cfg(not(feature = "emu"))]
fn emu_raw_loop(_: u64, _: &mut Latency) -> Result<(), String> {
    Err("built without the emu feature".into())
}

/// Line 5: from nothing to the guest's first hypercall and back to exit.
fn cold_start(
    b: &mut Bench,
    kvm: &Backends,
    emu: &Result<Box<dyn Hypervisor>, String>,
    rounds: u32,
) {
    let mut raw = Series::new(
        "cold-raw",
        "raw KVM: open, VM, one 4K slot, one vCPU, run to first exit, tear down",
    );
    let mut vk = Series::new(
        "cold-kvm",
        "vmcall on kvm: minimal ELF, boot setup, VM, vCPU thread, one hypercall, exit",
    );
    let mut ve = Series::new("cold-emu", "vmcall on emu: the same on the software CPU");
    for _ in 0..rounds {
        match kvm {
            Ok(list) => {
                raw.measure(|lat| cold_raw().map(|t| lat.record(t.as_nanos() as u64)));
                vk.measure(|lat| {
                    cold_vmcall(list[0].1.as_ref()).map(|t| lat.record(t.as_nanos() as u64))
                });
            }
            Err(why) => {
                raw.unavailable = Some(why.clone());
                vk.unavailable = Some(why.clone());
            }
        }
        match emu {
            Ok(hv) => {
                ve.measure(|lat| cold_vmcall(hv.as_ref()).map(|t| lat.record(t.as_nanos() as u64)))
            }
            Err(why) => ve.unavailable = Some(why.clone()),
        }
    }
    b.cold = vec![raw, vk, ve];
}

#[cfg(feature = "kvm")]
fn cold_raw() -> Result<Duration, String> {
    vmcall_kvm::baseline::cold_start_minimal().map_err(|e| e.to_string())
}

#[cfg(not(feature = "kvm"))]
fn cold_raw() -> Result<Duration, String> {
    Err("built without the kvm feature".into())
}

/// The smallest guest that makes one hypercall and exits: `mov eax, 20; vmcall; xor eax, eax;
/// out 0xf8, eax` — as little guest code as the raw baseline runs, so the comparison is of
/// the host side.
fn cold_guest() -> Vec<u8> {
    let mut code = vec![0xb8, BENCH_NR as u8, 0, 0, 0]; // mov eax, nr
    code.extend([0x0f, 0x01, 0xc1]); // vmcall
    code.extend([0x31, 0xc0]); // xor eax, eax
    code.extend([0xe7, vmcall_abi::ports::PORT_EXIT as u8]); // out imm8, eax
    vmcall_vmm::boot::elf::minimal_elf(0x20_0000, &code)
}

fn cold_vmcall(hv: &dyn Hypervisor) -> Result<Duration, String> {
    let image = cold_guest();
    let start = Instant::now();
    match bench_vm(hv, image, "", table())?.run().result {
        Ok(RunStatus::Exited(0)) => Ok(start.elapsed()),
        other => Err(format!("bench guest ended with {other:?}")),
    }
}

/// Line 6: host RSS of one idle VM beyond its guest RAM, per backend.
fn memory(b: &mut Bench, kvm: &Backends, emu: &Result<Box<dyn Hypervisor>, String>) {
    let kvm_result =
        kvm.as_ref().map_err(Clone::clone).and_then(|l| idle_overhead_kib(l[0].1.as_ref()));
    b.memory.push(("kvm".into(), kvm_result));
    let emu_result =
        emu.as_ref().map_err(Clone::clone).and_then(|hv| idle_overhead_kib(hv.as_ref()));
    b.memory.push(("emu".into(), emu_result));
}

/// RSS added by a running, idle VM, minus the resident part of its guest RAM, in KiB.
fn idle_overhead_kib(hv: &dyn Hypervisor) -> Result<f64, String> {
    let ready = Arc::new(AtomicBool::new(false));
    let table = Arc::new(HypercallTable::new());
    let flag = ready.clone();
    table
        .register(BENCH_NR, "ready", move |_: &Call<'_>| {
            flag.store(true, Ordering::SeqCst);
            Ok(0)
        })
        .expect("empty table");
    let before = rss_kib()?;
    let vm = bench_vm(hv, image().to_vec(), &format!("idle {BENCH_NR}"), table)?;
    let (ram_addr, _) = vm.ram().host_mapping();
    let ram_addr = ram_addr as usize;
    let stopper = vm.stopper();
    let runner = std::thread::spawn(move || vm.run());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(50));
    let during = rss_kib();
    let ram = mapping_rss_kib(ram_addr);
    stopper.stop();
    let _ = runner.join();
    if !ready.load(Ordering::SeqCst) {
        return Err("the idle guest never came up".into());
    }
    Ok(during? as f64 - before as f64 - ram? as f64)
}

fn rss_kib() -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| "no VmRSS in /proc/self/status".into())
}

/// Resident KiB of the mapping that contains `addr` (/proc/self/smaps).
fn mapping_rss_kib(addr: usize) -> Result<u64, String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(|e| e.to_string())?;
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("Rss:") {
                return v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(|_| "bad smaps".to_string());
            }
        }
    }
    Err("guest RAM mapping not found in /proc/self/smaps".into())
}
