//! Soak and load: many VMs at once on each backend, every vCPU making many hypercalls (single
//! and batched) while another thread keeps swapping their handler, round after round. Checks
//! that no call is lost or answered twice (the guest's counts against the host's statistics
//! and the handlers' own count), that every VM ends cleanly, and that the process's resident
//! memory stays flat from round to round. `scripts/soak.sh` runs it; docs/security.md says
//! what it proves.
//!
//! ```text
//! soak [--vms N] [--vcpus N] [--emu-calls N] [--kvm-calls N] [--rounds N] [--backend emu|kvm|both]
//! ```
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmcall_abi::hc::VMCALL_HC_BATCH;
use vmcall_conformance::{guest, Capture, Outcome};
use vmcall_kvm::{KvmHypervisor, Trap};
use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::hypercall::{Call, HypercallResult, HypercallTable};
use vmcall_vmm::vm::{RunStatus, VmBuilder};

struct Options {
    vms: usize,
    vcpus: u32,
    emu_calls: u64,
    kvm_calls: u64,
    rounds: usize,
    backend: String,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        vms: 32,
        vcpus: 4,
        emu_calls: 1_000_000,
        kvm_calls: 2_000,
        rounds: 4,
        backend: "both".into(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let num =
            |v: String| v.parse::<u64>().map_err(|_| format!("{flag}: '{v}' is not a number"));
        match flag.as_str() {
            "--vms" => o.vms = num(value()?)? as usize,
            "--vcpus" => o.vcpus = num(value()?)? as u32,
            "--emu-calls" => o.emu_calls = num(value()?)?,
            "--kvm-calls" => o.kvm_calls = num(value()?)?,
            "--rounds" => o.rounds = num(value()?)?.max(1) as usize,
            "--backend" => o.backend = value()?,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

/// Resident memory of this process, from /proc/self/statm.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Handler version `tag`: answers `(tag << 32) | a0` and counts what it answered.
fn tagged(tag: u64, answered: Arc<AtomicU64>) -> impl Fn(&Call<'_>) -> HypercallResult {
    move |c: &Call<'_>| {
        answered.fetch_add(1, Ordering::Relaxed);
        Ok(tag << 32 | (c.args[0] & 0xffff_ffff))
    }
}

#[derive(Default)]
struct Totals {
    vms: u64,
    calls: u64,
    swaps: u64,
}

/// What one VM's soak gives: the calls it made and the handler swaps during it, or what went
/// wrong.
type VmResult = Result<(u64, u64), String>;

/// One VM: run the soak guest while a thread swaps hypercall 20's handler; check its counts.
fn soak_vm(hv: &dyn Hypervisor, vcpus: u32, calls: u64) -> VmResult {
    let answered = Arc::new(AtomicU64::new(0));
    let table = Arc::new(HypercallTable::new());
    table.register(20, "tag1", tagged(1, answered.clone())).map_err(|e| e.to_string())?;
    let running = AtomicBool::new(true);
    let swaps = AtomicU64::new(0);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut tag = 1;
            while running.load(Ordering::Relaxed) {
                tag = tag % 3 + 1;
                let name = format!("tag{tag}");
                table.replace(20, &name, tagged(tag, answered.clone())).expect("registered");
                swaps.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let out = run(hv, vcpus, calls, table.clone());
        running.store(false, Ordering::Relaxed);
        out
    });
    match &out.result {
        Ok(RunStatus::AllHalted) => {}
        other => return Err(format!("ended with {other:?}\n{}", out.console)),
    }
    let (mut single, mut batches, mut entries, mut wrong, mut lines) = (0, 0, 0, 0, 0);
    for line in out.lines("soak vcpu=") {
        let field = |key: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or(u64::MAX)
        };
        single += field("single=");
        batches += field("batches=");
        entries += field("entries=");
        wrong += field("wrong=");
        lines += 1;
    }
    let host = |nr: u64| out.stats.hypercalls.get(&nr).map_or(0, |l| l.count);
    let handled = answered.load(Ordering::Relaxed);
    let checks = [
        (lines == u64::from(vcpus), "one report per vCPU"),
        (wrong == 0, "every answer came from a current handler"),
        (single == host(20), "single calls: guest count = host statistics"),
        (batches == host(VMCALL_HC_BATCH), "batches: guest count = host statistics"),
        (single + entries == handled, "calls answered by the handlers = calls made"),
        (single + entries == calls * u64::from(vcpus), "every call made"),
    ];
    for (ok, what) in checks {
        if !ok {
            return Err(format!(
                "{what}: single={single} batches={batches} entries={entries} wrong={wrong} \
                 host single={} host batches={} handled={handled}\n{}",
                host(20),
                host(VMCALL_HC_BATCH),
                out.console
            ));
        }
    }
    Ok((single + entries, swaps.load(Ordering::Relaxed)))
}

fn run(hv: &dyn Hypervisor, vcpus: u32, calls: u64, table: Arc<HypercallTable>) -> Outcome {
    let console = Arc::new(Mutex::new(Vec::new()));
    let sink = Capture(console.clone());
    let vm = VmBuilder::new(guest("soak"))
        .vcpus(vcpus)
        .cmdline(calls.to_string())
        .table(table)
        .timeout(Some(Duration::from_secs(600)))
        .console(Box::new(sink))
        .build(hv)
        .expect("build soak VM");
    let report = vm.run();
    if !report.stuck_vcpus.is_empty() {
        eprintln!("soak: vCPUs {:?} left behind after {:?}", report.stuck_vcpus, report.elapsed);
    }
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    Outcome { console, result: report.result, stats: report.stats }
}

fn main() {
    let o = options().unwrap_or_else(|e| {
        eprintln!("soak: {e}");
        std::process::exit(2)
    });
    let mut backends: Vec<(&str, Box<dyn Hypervisor>, u64)> = Vec::new();
    if o.backend == "emu" || o.backend == "both" {
        backends.push(("emu", Box::new(vmcall_emu::EmuHypervisor::new()), o.emu_calls));
    }
    if o.backend == "kvm" || o.backend == "both" {
        match KvmHypervisor::open(Trap::Auto) {
            Ok(hv) => backends.push(("kvm", Box::new(hv), o.kvm_calls)),
            Err(e) => println!("SKIP soak on kvm: {e}"),
        }
    }
    println!(
        "soak: {} rounds; each round {} VMs at once per backend ({}), {} vCPUs each",
        o.rounds,
        o.vms,
        backends
            .iter()
            .map(|b| format!("{} {} calls/vCPU", b.0, b.2))
            .collect::<Vec<_>>()
            .join(", "),
        o.vcpus
    );
    let start = Instant::now();
    let rss_start = rss_bytes();
    let mut rss_rounds = Vec::new();
    let mut totals: Vec<Totals> = backends.iter().map(|_| Totals::default()).collect();
    let mut failures = Vec::new();
    for round in 1..=o.rounds {
        let round_start = Instant::now();
        let results: Vec<(usize, VmResult)> = std::thread::scope(|s| {
            let handles: Vec<_> = backends
                .iter()
                .enumerate()
                .flat_map(|(b, (_, hv, calls))| {
                    (0..o.vms).map(move |_| (b, hv, *calls)).collect::<Vec<_>>()
                })
                .map(|(b, hv, calls)| s.spawn(move || (b, soak_vm(hv.as_ref(), o.vcpus, calls))))
                .collect();
            handles.into_iter().map(|h| h.join().expect("soak thread")).collect()
        });
        for (b, r) in results {
            match r {
                Ok((calls, swaps)) => {
                    totals[b].vms += 1;
                    totals[b].calls += calls;
                    totals[b].swaps += swaps;
                }
                Err(e) => failures.push(format!("round {round}, {}: {e}", backends[b].0)),
            }
        }
        let rss = rss_bytes();
        rss_rounds.push(rss);
        println!(
            "round {round}: {:.1}s, RSS {:.1} MiB, failures so far {}",
            round_start.elapsed().as_secs_f64(),
            mib(rss),
            failures.len()
        );
    }
    for ((name, _, _), t) in backends.iter().zip(&totals) {
        println!(
            "{name}: {} VMs ended cleanly, {} calls, 0 lost, {} handler swaps",
            t.vms, t.calls, t.swaps
        );
    }
    // Flat: the allocator's arenas, thread stacks and the engines' buffers grow during the
    // first rounds and then stay; a leak keeps growing. So the last round may not be more
    // than 16 MiB or 10% (whichever is larger) above the highest RSS of the first half.
    let warm = rss_rounds.len().div_ceil(2);
    let warm_max = *rss_rounds[..warm].iter().max().expect("one round at least");
    let last = *rss_rounds.last().expect("one round at least");
    let allowed = (16 << 20).max(warm_max / 10);
    println!(
        "RSS: {:.1} MiB at start, {:.1} MiB at most in rounds 1-{warm}, {:.1} MiB at the end \
         (by round: {} MiB)",
        mib(rss_start),
        mib(warm_max),
        mib(last),
        rss_rounds.iter().map(|r| format!("{:.1}", mib(*r))).collect::<Vec<_>>().join(" ")
    );
    if last > warm_max + allowed {
        failures.push(format!(
            "RSS grew by {:.1} MiB after round {warm} (allowed {:.1} MiB): a leak",
            mib(last - warm_max),
            mib(allowed)
        ));
    }
    println!("soak: {:.1}s", start.elapsed().as_secs_f64());
    if failures.is_empty() {
        println!("soak: {} passed, 0 failed", totals.iter().map(|t| t.vms).sum::<u64>());
    } else {
        for f in &failures {
            eprintln!("soak: FAILED: {f}");
        }
        println!("soak: FAILED ({} failures)", failures.len());
        std::process::exit(1);
    }
}
