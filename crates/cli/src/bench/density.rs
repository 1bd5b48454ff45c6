//! `vmcall bench --density N`: many small VMs at once in one process, through the library.
//!
//! For each backend and each fleet size of a ladder (1, 10, 100, ... up to N), a child process
//! (`vmcall bench --density-step BACKEND:N`, so every size starts from a fresh heap) builds N
//! VMs one after another on one launcher thread, each running the density guest
//! (`guests/src/bin/density.rs`) with 4 MiB of RAM, and waits for each VM's first hypercall:
//!
//! - **start latency**: from `VmBuilder::new` to the host receiving that VM's first hypercall
//!   (image loaded, boot structures written, backend VM, vCPU, vCPU thread,
//!   guest boot), measured while the VMs started before it stay resident;
//! - **idle**: that first hypercall parks: its handler blocks the vCPU thread until the host
//!   lets the fleet go. With all N parked the child reads its RSS and subtracts the RSS from
//!   before the fleet and the resident pages of every VM's guest RAM (counted page by page in
//!   /proc/self/pagemap), which gives **RSS per VM beyond guest RAM**;
//! - **throughput**: then every VM makes its calls at once (each answer checked by the guest,
//!   each count by the host); total hypercalls per second over the wall time of that phase.
//!
//! docs/bench.md ("Density") says what the figures mean and what the targets are.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::hypercall::{Call, HypercallTable};
use vmcall_vmm::stats::Latency;
use vmcall_vmm::vm::{RunReport, RunStatus, VmBuilder};

use crate::BenchArgs;

/// The hypercall every VM parks in until the fleet is let go; answered `a0 + 1`.
const PARK_NR: u64 = 21;
/// The hypercall of the busy phase; answered `a0 * 1_000_003 + a1` (wrapping).
const CALL_NR: u64 = 20;
/// Guest RAM of every VM: the smallest the guests (linked at 2 MiB) fit in.
const RAM: u64 = 4 << 20;
/// Calls of the busy phase per fleet, shared out among its VMs (at least [`MIN_CALLS`] each),
/// so that every fleet size runs about as long.
const EMU_TOTAL_CALLS: u64 = 1_000_000;
const KVM_TOTAL_CALLS: u64 = 20_000;
const MIN_CALLS: u64 = 100;
/// How long one VM may take from `build` to its first hypercall before the fleet stops growing.
const START_LIMIT: Duration = Duration::from_secs(20);
/// A child process (one fleet) that takes longer than this is killed.
const CHILD_LIMIT: Duration = Duration::from_secs(900);
/// Every VM's own run timeout: the whole life of the fleet.
const VM_TIMEOUT: Duration = Duration::from_secs(600);

/// The targets of docs/bench.md.
const TARGET_VMS: u32 = 1000;
const TARGET_RSS_KIB: f64 = 3.0 * 1024.0;
const TARGET_START_P99_MS: f64 = 5.0;

/// What one fleet measured (a child's one line of JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Fleet {
    pub backend: String,
    pub requested: u32,
    /// VMs that reached their first hypercall.
    pub started: u32,
    /// Why the fleet stopped growing before `requested`, if it did.
    pub limit: Option<String>,
    pub start_median_ms: f64,
    pub start_p99_ms: f64,
    pub start_max_ms: f64,
    /// The part of the start spent in `VmBuilder::build` (image, boot structures, backend VM,
    /// seccomp filters), before any thread exists.
    pub build_median_ms: f64,
    pub build_p99_ms: f64,
    /// CPU time (every thread of the process, user and system) the bring-up took, per VM:
    /// what a start costs whatever else the host is doing (10 ms resolution overall).
    pub start_cpu_ms: f64,
    /// From the first build to the last VM's first hypercall.
    pub bring_up_s: f64,
    pub rss_before_kib: u64,
    pub rss_idle_kib: u64,
    /// Resident pages of all guest RAM, in KiB.
    pub guest_ram_kib: u64,
    /// (idle − before − guest RAM) / started.
    pub per_vm_kib: f64,
    pub threads: u64,
    pub fds: u64,
    pub calls_per_vm: u64,
    /// From letting the fleet go to the last VM's last answer.
    pub busy_s: f64,
    /// From then until every VM had ended and was collected.
    pub teardown_s: f64,
    /// CPU time of the process while the VMs made their calls (to within a millisecond).
    pub cpu_busy_s: f64,
    pub calls_per_s: f64,
    /// VMs whose run ended with status 0 and the expected counts.
    pub ok_vms: u32,
    /// The first few failures, if any.
    pub failures: Vec<String>,
    /// The host's 1-minute load average when the fleet started (other work on the machine
    /// lengthens the start-latency tail most of all).
    pub load: f64,
}

/// The fleet sizes measured for `--density n`: 1, 10, 100, ... below n, then n.
fn ladder(n: u32) -> Vec<u32> {
    let mut sizes: Vec<u32> =
        std::iter::successors(Some(1u32), |s| s.checked_mul(10)).take_while(|s| *s < n).collect();
    sizes.push(n);
    sizes
}

/// `vmcall bench --density N`: every fleet size on every backend, each in a child process.
pub fn run(n: u32, args: &BenchArgs) -> Result<(), String> {
    crate::instances::raise_fd_limit();
    let exe = std::env::current_exe().map_err(|e| format!("cannot find vmcall itself: {e}"))?;
    let mut rows: Vec<(String, u32, Result<Fleet, String>)> = Vec::new();
    for backend in ["emu", "kvm"] {
        let available = match backend {
            "emu" => crate::backends::emu().map(drop),
            _ => crate::backends::kvm("rewrite").map(drop),
        };
        if let Err(why) = available {
            // Size 0: the backend itself is unavailable, no fleet was tried.
            rows.push((backend.into(), 0, Err(why)));
            continue;
        }
        for size in ladder(n) {
            eprintln!("vmcall bench --density: {backend}, {size} VMs ...");
            let fleet = child(&exe, backend, size);
            let stop = !fleet.as_ref().is_ok_and(|f| f.started >= f.requested);
            rows.push((backend.into(), size, fleet));
            // A backend that could not hold this many (or whose fleet process failed) will
            // not hold more.
            if stop {
                break;
            }
        }
    }
    let text = render(n, &rows);
    print!("{text}");
    if let Some(path) = &args.json {
        let doc: Vec<serde_json::Value> = rows
            .iter()
            .map(|(b, size, r)| match r {
                Ok(f) => serde_json::to_value(f).expect("serialisable"),
                Err(why) if *size == 0 => serde_json::json!({"backend": b, "unavailable": why}),
                Err(why) => serde_json::json!({"backend": b, "requested": size, "error": why}),
            })
            .collect();
        let doc = serde_json::json!({ "density": doc });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("serialisable") + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("vmcall bench: wrote {}", path.display());
    }
    let failed: Vec<String> = rows
        .iter()
        .filter_map(|(b, size, r)| match r {
            Ok(f) if !f.failures.is_empty() => {
                Some(format!("{b} x{size}: {}", f.failures.join("; ")))
            }
            Err(why) if *size > 0 => Some(format!("{b} x{size}: {why}")),
            _ => None,
        })
        .collect();
    if !failed.is_empty() {
        return Err(format!(
            "density: fleets failed or VMs answered wrongly:\n{}",
            failed.join("\n")
        ));
    }
    let missed = missed(&rows);
    if args.check && !missed.is_empty() {
        return Err(format!("{} density target(s) missed: {}", missed.len(), missed.join("; ")));
    }
    Ok(())
}

/// The emu fleet the targets are judged on: the one that started the most VMs.
fn best<'r>(rows: &'r [(String, u32, Result<Fleet, String>)], b: &str) -> Option<&'r Fleet> {
    rows.iter()
        .filter(|(backend, _, _)| backend == b)
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .max_by_key(|f| f.started)
}

/// The density targets `f` (the largest software-CPU fleet) is judged on, each with whether it
/// was met; none when the run did not go to [`TARGET_VMS`] VMs (not judged).
fn emu_targets(f: &Fleet) -> Vec<(&'static str, bool)> {
    if f.requested < TARGET_VMS {
        return Vec::new();
    }
    vec![
        ("emu: 1000 idle VMs", f.started >= TARGET_VMS && f.failures.is_empty()),
        ("emu: RSS per VM <= 3 MiB", f.per_vm_kib <= TARGET_RSS_KIB),
        ("emu: start p99 <= 5 ms", f.start_p99_ms <= TARGET_START_P99_MS),
    ]
}

/// The density targets this run missed, for `--check` (targets not judged are not missed).
fn missed(rows: &[(String, u32, Result<Fleet, String>)]) -> Vec<String> {
    best(rows, "emu")
        .map(emu_targets)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(what, _)| what.to_string())
        .collect()
}

/// Run one fleet in a child process and read its line of JSON.
fn child(exe: &std::path::Path, backend: &str, size: u32) -> Result<Fleet, String> {
    let mut proc = Command::new(exe)
        .args(["bench", "--density-step", &format!("{backend}:{size}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let deadline = Instant::now() + CHILD_LIMIT;
    let status = loop {
        match proc.try_wait().map_err(|e| e.to_string())? {
            Some(status) => break status,
            None if Instant::now() > deadline => {
                let _ = proc.kill();
                let _ = proc.wait();
                return Err(format!("the fleet took longer than {CHILD_LIMIT:?}; killed"));
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut out = String::new();
    if let Some(mut o) = proc.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let line = out.lines().rev().find(|l| l.starts_with('{'));
    match line {
        Some(l) => serde_json::from_str(l).map_err(|e| format!("bad report from the fleet: {e}")),
        None => Err(format!("the fleet process ended with {status} and no report")),
    }
}

/// `vmcall bench --density-step BACKEND:N` (the child): one fleet, one line of JSON.
pub fn step(spec: &str) -> Result<(), String> {
    crate::instances::raise_fd_limit();
    let (backend, n) = spec
        .split_once(':')
        .and_then(|(b, n)| Some((b, n.parse::<u32>().ok()?)))
        .ok_or_else(|| format!("--density-step {spec}: expected BACKEND:N"))?;
    let (hv, total) = match backend {
        "emu" => (crate::backends::emu()?, EMU_TOTAL_CALLS),
        "kvm" => (crate::backends::kvm("rewrite")?, KVM_TOTAL_CALLS),
        other => return Err(format!("--density-step: unknown backend '{other}'")),
    };
    let calls = (total / u64::from(n.max(1))).max(MIN_CALLS);
    let fleet = measure(hv.as_ref(), backend, n, calls)?;
    println!("{}", serde_json::to_string(&fleet).expect("serialisable"));
    Ok(())
}

/// The host side every VM of a fleet shares: when each parked, and the gate that holds them.
struct Parking {
    arrived: Mutex<Vec<Option<Instant>>>,
    arrived_cv: Condvar,
    open: Mutex<bool>,
    open_cv: Condvar,
    /// When the last VM answered its last call.
    last_call: Mutex<Option<Instant>>,
    /// VMs whose last call has been answered.
    finished: AtomicU32,
}

impl Parking {
    fn new(n: usize, open: bool) -> Arc<Self> {
        Arc::new(Self {
            arrived: Mutex::new(vec![None; n]),
            arrived_cv: Condvar::new(),
            open: Mutex::new(open),
            open_cv: Condvar::new(),
            last_call: Mutex::new(None),
            finished: AtomicU32::new(0),
        })
    }

    fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.open_cv.notify_all();
    }

    /// When VM `id` parked, waiting up to `limit` for it (None: it did not, or its run ended).
    fn wait_arrival(
        &self,
        id: usize,
        limit: Duration,
        ended: impl Fn() -> bool,
    ) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        let mut arrived = self.arrived.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(t) = arrived[id] {
                return Some(t);
            }
            let now = Instant::now();
            if now >= deadline || ended() {
                return None;
            }
            // Short waits: a run that ends early (a backend error) does not notify.
            let wait = (deadline - now).min(Duration::from_millis(20));
            arrived =
                self.arrived_cv.wait_timeout(arrived, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// Opens the gate when dropped, so that no early return leaves vCPU threads parked for good.
struct OpenOnDrop(Arc<Parking>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// The table every VM of a fleet shares (as `vmcall run --instances` does).
fn fleet_table(parking: &Arc<Parking>, calls: u64) -> Arc<HypercallTable> {
    let table = Arc::new(HypercallTable::new());
    let p = parking.clone();
    table
        .register(PARK_NR, "park", move |c: &Call<'_>| {
            let now = Instant::now();
            let id = c.args[0];
            {
                let mut arrived = p.arrived.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(slot) = usize::try_from(id).ok().and_then(|i| arrived.get_mut(i)) {
                    slot.get_or_insert(now);
                }
            }
            p.arrived_cv.notify_all();
            let mut open = p.open.lock().unwrap_or_else(|e| e.into_inner());
            while !*open {
                open = p.open_cv.wait(open).unwrap_or_else(|e| e.into_inner());
            }
            Ok(id.wrapping_add(1))
        })
        .expect("empty table");
    let p = parking.clone();
    table
        .register(CALL_NR, "answer", move |c: &Call<'_>| {
            if c.args[1].wrapping_add(1) == calls {
                let now = Instant::now();
                let mut last = p.last_call.lock().unwrap_or_else(|e| e.into_inner());
                *last = Some(last.map_or(now, |l| l.max(now)));
                p.finished.fetch_add(1, Ordering::SeqCst);
            }
            Ok(c.args[0].wrapping_mul(1_000_003).wrapping_add(c.args[1]))
        })
        .expect("free number");
    table
}

/// Build, park, measure and run one fleet of `n` VMs making `calls` calls each.
pub(crate) fn measure(
    hv: &dyn Hypervisor,
    backend: &str,
    n: u32,
    calls: u64,
) -> Result<Fleet, String> {
    let image = crate::builtin::DENSITY;
    // One VM first, built, run and dropped, so that what a process pays once (the engine's
    // global set-up, the allocator's first arenas) is not charged to the fleet.
    warm_up(hv, image)?;
    let parking = Parking::new(n as usize, false);
    let gate = OpenOnDrop(parking.clone());
    let table = fleet_table(&parking, calls);
    let load = load_average();
    let rss_before = rss_kib()?;
    let cpu_before = cpu_seconds();
    let mut start = Latency::default();
    let mut build = Latency::default();
    let mut runs = Vec::new();
    let mut rams = Vec::new();
    let mut limit = None;
    let bring_up = Instant::now();
    for id in 0..n as usize {
        let t0 = Instant::now();
        let built = VmBuilder::new(image.to_vec())
            .memory(RAM)
            .cmdline(format!("{id} {calls} {PARK_NR} {CALL_NR}"))
            .table(table.clone())
            .timeout(Some(VM_TIMEOUT))
            .console(Box::new(std::io::sink()))
            .build(hv);
        build.record(t0.elapsed().as_nanos() as u64);
        let vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                limit = Some(format!("VM {} could not be built: {}", id + 1, crate::chain(&e)));
                break;
            }
        };
        rams.push(vm.ram().host_mapping());
        // No thread of ours per VM: `start` returns once the vCPU thread runs.
        let running = match vm.start() {
            Ok(r) => r,
            Err(report) => {
                rams.pop();
                limit = Some(format!(
                    "VM {} could not start: {}",
                    id + 1,
                    report.result.err().map_or_else(String::new, |e| crate::chain(&e))
                ));
                break;
            }
        };
        let monitor = running.monitor();
        let arrived = parking.wait_arrival(id, START_LIMIT, || monitor.stopping());
        runs.push(running);
        match arrived {
            Some(t) => start.record(t.saturating_duration_since(t0).as_nanos() as u64),
            None => {
                limit = Some(format!(
                    "VM {} made no hypercall within {START_LIMIT:?} (its run ended or hung)",
                    id + 1
                ));
                break;
            }
        }
    }
    let bring_up_s = bring_up.elapsed().as_secs_f64();
    let bring_up_cpu = cpu_seconds() - cpu_before;
    let started = start.count as u32;
    // Let the last vCPU thread settle into its wait before reading memory.
    std::thread::sleep(Duration::from_millis(100));
    let rss_idle = rss_kib()?;
    let guest_ram = resident_kib(&rams)?;
    let threads = status_field("Threads:").unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);

    let cpu_start = cpu_seconds(); // of the whole process, so far
    let busy = Instant::now();
    drop(gate);
    // Until every VM has had its last answer (or they have all ended some other way), so
    // that the CPU time is that of the calls, not of the VMs' teardown.
    let monitors: Vec<_> = runs.iter().map(|r| r.monitor()).collect();
    for tick in 0u64.. {
        if parking.finished.load(Ordering::SeqCst) >= started || busy.elapsed() > VM_TIMEOUT {
            break;
        }
        if tick % 100 == 99 && monitors.iter().all(|m| m.stopping()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cpu_busy_s = cpu_seconds() - cpu_start;
    let reports: Vec<RunReport> = runs.into_iter().map(|r| r.wait()).collect();
    let torn_down = busy.elapsed();
    // The calls' own time: until the last answer, without the VMs' ends and teardown.
    let last_call = *parking.last_call.lock().unwrap_or_else(|e| e.into_inner());
    let busy_s = last_call.map_or(torn_down, |l| l.saturating_duration_since(busy)).as_secs_f64();

    let mut failures = Vec::new();
    let mut ok_vms = 0;
    let mut answered = 0;
    for (id, report) in reports.iter().enumerate() {
        let count = |nr: u64| report.stats.hypercalls.get(&nr).map_or(0, |l| l.count);
        answered += count(CALL_NR);
        let verdict = match &report.result {
            // Only the VMs that parked were let go; one that never did is the limit.
            _ if id as u32 >= started => Ok(()),
            Ok(RunStatus::Exited(0)) if count(CALL_NR) == calls && count(PARK_NR) == 1 => {
                ok_vms += 1;
                Ok(())
            }
            Ok(RunStatus::Exited(0)) => Err(format!(
                "host counted {} calls and {} parks, expected {calls} and 1",
                count(CALL_NR),
                count(PARK_NR)
            )),
            Ok(RunStatus::Exited(w)) => Err(format!("the guest saw {w} wrong answers")),
            other => Err(format!("ended with {other:?}")),
        };
        if let Err(e) = verdict {
            if failures.len() < 5 {
                failures.push(format!("VM {}: {e}", id + 1));
            }
        }
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    let per_vm_kib = if started == 0 {
        0.0
    } else {
        (rss_idle as f64 - rss_before as f64 - guest_ram as f64) / f64::from(started)
    };
    Ok(Fleet {
        backend: backend.into(),
        requested: n,
        started,
        limit,
        start_median_ms: ms(start.quantile_ns(0.5)),
        start_p99_ms: ms(start.quantile_ns(0.99)),
        start_max_ms: ms(if start.count > 0 { start.max_ns } else { 0 }),
        build_median_ms: ms(build.quantile_ns(0.5)),
        build_p99_ms: ms(build.quantile_ns(0.99)),
        start_cpu_ms: if started == 0 { 0.0 } else { bring_up_cpu * 1e3 / f64::from(started) },
        bring_up_s,
        rss_before_kib: rss_before,
        rss_idle_kib: rss_idle,
        guest_ram_kib: guest_ram,
        per_vm_kib,
        threads,
        fds,
        calls_per_vm: calls,
        busy_s,
        teardown_s: torn_down.as_secs_f64() - busy_s,
        cpu_busy_s,
        calls_per_s: if busy_s > 0.0 { answered as f64 / busy_s } else { 0.0 },
        ok_vms,
        failures,
        load,
    })
}

/// One VM that parks and is let go at once, run to its end.
fn warm_up(hv: &dyn Hypervisor, image: &[u8]) -> Result<(), String> {
    let parking = Parking::new(1, true);
    let report = VmBuilder::new(image.to_vec())
        .memory(RAM)
        .cmdline(format!("0 {MIN_CALLS} {PARK_NR} {CALL_NR}"))
        .table(fleet_table(&parking, MIN_CALLS))
        .timeout(Some(Duration::from_secs(60)))
        .console(Box::new(std::io::sink()))
        .build(hv)
        .map_err(|e| crate::chain(&e))?
        .run();
    match report.result {
        Ok(RunStatus::Exited(0)) => Ok(()),
        other => Err(format!("the warm-up VM ended with {other:?}")),
    }
}

/// A field of /proc/self/status, in its own unit (kB for memory).
fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User and system CPU time of the whole process so far (/proc/self/stat, in the fixed
/// 100 Hz USER_HZ of Linux's ABI).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |i: usize| rest.split_whitespace().nth(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    (field(11).unwrap_or(0) + field(12).unwrap_or(0)) as f64 / 100.0
}

/// The 1-minute load average (0 if unknown).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib() -> Result<u64, String> {
    status_field("VmRSS:").ok_or_else(|| "no VmRSS in /proc/self/status".into())
}

/// Resident KiB of the given mappings (guest RAM), page by page from /proc/self/pagemap: its
/// 64-bit entry per page has bit 63 set when the page is in RAM (bit 62: in swap).
fn resident_kib(ranges: &[(*mut u8, usize)]) -> Result<u64, String> {
    const PAGE: usize = 4096;
    let pagemap = std::fs::File::open("/proc/self/pagemap")
        .map_err(|e| format!("/proc/self/pagemap: {e}"))?;
    let mut pages = 0u64;
    let mut buf = Vec::new();
    for &(addr, len) in ranges {
        let first = addr as usize / PAGE;
        let count = len.div_ceil(PAGE);
        buf.resize(count * 8, 0);
        pagemap
            .read_exact_at(&mut buf, (first * 8) as u64)
            .map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        pages += buf
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) & (3 << 62) != 0)
            .count() as u64;
    }
    Ok(pages * (PAGE as u64 / 1024))
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

/// The report: one row per backend and fleet size, then the targets.
fn render(n: u32, rows: &[(String, u32, Result<Fleet, String>)]) -> String {
    let mut s = String::from(
        "\nDensity: N VMs at once in one process (4 MiB guest RAM each, one vCPU, one shared table)\n",
    );
    s += &format!(
        "{:<4} {:>5} {:>7} {:>9} {:>9} {:>9} {:>9} {:>7} {:>5} {:>12} {:>12} {:>5}\n",
        "",
        "N",
        "started",
        "start p50",
        "start p99",
        "CPU/start",
        "RSS/VM",
        "threads",
        "fds",
        "hypercalls/s",
        "per CPU-s",
        "load"
    );
    for (backend, size, r) in rows {
        match r {
            Ok(f) => {
                let per_cpu =
                    if f.cpu_busy_s > 0.0 { f.calls_per_s * f.busy_s / f.cpu_busy_s } else { 0.0 };
                s += &format!(
                    "{:<4} {:>5} {:>7} {:>7.2}ms {:>7.2}ms {:>7.2}ms {:>6.0}KiB {:>7} {:>5} {:>12.0} {:>12.0} {:>5.1}\n",
                    backend,
                    size,
                    f.started,
                    f.start_median_ms,
                    f.start_p99_ms,
                    f.start_cpu_ms,
                    f.per_vm_kib,
                    f.threads,
                    f.fds,
                    f.calls_per_s,
                    per_cpu,
                    f.load
                );
                if let Some(why) = &f.limit {
                    s += &format!("     limit: {} of {} VMs: {why}\n", f.started, f.requested);
                }
                for e in &f.failures {
                    s += &format!("     FAILED: {e}\n");
                }
            }
            Err(why) if *size == 0 => s += &format!("{backend:<4} unavailable: {why}\n"),
            Err(why) => s += &format!("{backend:<4} {size:>5} FAILED: {why}\n"),
        }
    }
    s += "Start: VmBuilder::new to the VM's first hypercall, one VM after another while the earlier\n\
          ones stay resident; CPU/start: the process's CPU time over the bring-up, per VM.\n\
          RSS/VM: process RSS with every VM parked, minus RSS before the fleet, minus the resident\n\
          pages of all guest RAM (/proc/self/pagemap), per VM. Hypercalls/s: every VM calling at\n\
          once, to the last answer; per CPU-s: the same per second of the process's CPU time.\n\
          Load: the host's 1-minute load average as the fleet started.\n";
    let best = |b: &str| best(rows, b);
    s += "\nDensity targets\n";
    match best("emu") {
        Some(f) if f.requested >= TARGET_VMS => {
            let [ok, rss_ok, p99_ok] = [0, 1, 2].map(|i| emu_targets(f)[i].1);
            s += &format!(
                "  emu: {TARGET_VMS} idle VMs in one process: {} of {} started, {} ended right: {}\n",
                f.started,
                f.requested,
                f.ok_vms,
                met(ok)
            );
            s += &format!(
                "  emu: RSS per VM beyond guest RAM {:.0} KiB ({:.2} MiB) <= 3 MiB: {}\n",
                f.per_vm_kib,
                f.per_vm_kib / 1024.0,
                met(rss_ok)
            );
            s += &format!(
                "  emu: start p99 {:.2} ms (median {:.2} ms) <= {TARGET_START_P99_MS} ms: {}\n",
                f.start_p99_ms,
                f.start_median_ms,
                met(p99_ok)
            );
        }
        Some(f) => {
            s += &format!(
                "  emu: targets are for {TARGET_VMS} VMs; this run went to {} (--density {TARGET_VMS}): not judged\n",
                f.requested
            );
        }
        None => s += "  emu: unavailable\n",
    }
    match best("kvm") {
        Some(f) => {
            s += &format!(
                "  kvm: {} of {} VMs started in one process ({}); start p99 {:.2} ms, RSS/VM {:.0} KiB\n",
                f.started,
                f.requested,
                match &f.limit {
                    Some(why) => format!("limit reached: {why}"),
                    None => format!("no limit reached up to {n}"),
                },
                f.start_p99_ms,
                f.per_vm_kib
            );
        }
        None => s += "  kvm: unavailable\n",
    }
    // A fleet process that failed outright (a crash, a hang) is a limit too.
    for (backend, size, r) in rows {
        if let (Err(why), true) = (r, *size > 0) {
            s += &format!("  {backend}: the fleet of {size} failed: {why}\n");
        }
    }
    for b in ["emu", "kvm"] {
        let fleets: Vec<&Fleet> = rows
            .iter()
            .filter(|(backend, _, _)| backend == b)
            .filter_map(|(_, _, r)| r.as_ref().ok())
            .collect();
        if let (Some(one), Some(last)) = (fleets.first(), fleets.last()) {
            if fleets.len() > 1 && one.calls_per_s > 0.0 {
                let cores = |f: &Fleet| if f.busy_s > 0.0 { f.cpu_busy_s / f.busy_s } else { 0.0 };
                s += &format!(
                    "  {b}: hypercalls/s with {} VMs = {:.2} x one VM's, using {:.2} cores against {:.2} \
                     (of {} here; the rest went to other work)\n",
                    last.started,
                    last.calls_per_s / one.calls_per_s,
                    cores(last),
                    cores(one),
                    std::thread::available_parallelism().map_or(1, |p| p.get())
                );
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladder_goes_by_tens_to_n() {
        assert_eq!(ladder(1), vec![1]);
        assert_eq!(ladder(8), vec![1, 8]);
        assert_eq!(ladder(50), vec![1, 10, 50]);
        assert_eq!(ladder(1000), vec![1, 10, 100, 1000]);
    }

    fn fleet(requested: u32, started: u32, per_vm_kib: f64, start_p99_ms: f64) -> Fleet {
        Fleet {
            backend: "emu".into(),
            requested,
            started,
            limit: None,
            start_median_ms: 1.0,
            start_p99_ms,
            start_max_ms: start_p99_ms,
            build_median_ms: 0.5,
            build_p99_ms: 0.5,
            start_cpu_ms: 1.0,
            bring_up_s: 1.0,
            rss_before_kib: 0,
            rss_idle_kib: 0,
            guest_ram_kib: 0,
            per_vm_kib,
            threads: 1,
            fds: 3,
            calls_per_vm: 100,
            busy_s: 1.0,
            teardown_s: 0.1,
            cpu_busy_s: 1.0,
            calls_per_s: 1e6,
            ok_vms: started,
            failures: Vec::new(),
            load: 0.0,
        }
    }

    #[test]
    fn check_fails_on_missed_targets_only_when_judged() {
        let rows = |f: Fleet| vec![("emu".to_string(), f.requested, Ok(f))];
        assert!(missed(&rows(fleet(1000, 1000, 900.0, 4.0))).is_empty());
        assert_eq!(missed(&rows(fleet(1000, 1000, 900.0, 20.0))), vec!["emu: start p99 <= 5 ms"]);
        assert_eq!(
            missed(&rows(fleet(1000, 700, 4000.0, 1.0))),
            vec!["emu: 1000 idle VMs", "emu: RSS per VM <= 3 MiB"]
        );
        assert!(missed(&rows(fleet(8, 8, 9000.0, 90.0))).is_empty(), "below 1000: not judged");
        assert!(missed(&[("emu".into(), 0, Err("no emu".into()))]).is_empty());
    }
}
