//! Recordings on the command line: `vmcall run --record FILE` (the recorder and its header),
//! `vmcall replay FILE` (guest-less, or `--guest` to re-run and compare) and `vmcall stats
//! FILE` (docs/record.md). The format, the replay engine and the comparison are the library's
//! (`vmcall_vmm::record`); this module builds tables, runs guests and prints.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use vmcall_vmm::hypercall::{AnsweredBy, HypercallTable};
use vmcall_vmm::record::{
    self, CallEntry, Header, Recorder, RecordingReader, StreamComparer, Verdict,
};
use vmcall_vmm::seccomp::Seccomp;
use vmcall_vmm::stats::VcpuStats;
use vmcall_vmm::trace::TraceSwitch;
use vmcall_vmm::vm::{RunError, RunStatus, VmBuilder};
use vmcall_vmm::x86::cpuid::PvCpuid;

use crate::handlers::{BuildOptions, HandlerSpec};

/// Exit status of `vmcall replay` when a result or the call stream differs (as diff(1)).
pub const EXIT_DIFFERS: u8 = 1;

/// `vmcall replay`'s options.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The recording (`vmcall run --record`); `-` reads it from stdin.
    file: PathBuf,
    /// Answer NR with HANDLER instead of the recorded handler (repeatable; any kind
    /// `vmcall run --hypercall` takes). The rest of the recorded table stays.
    #[arg(long = "hypercall", value_name = "NR=HANDLER", value_parser = crate::handlers::parse_assignment)]
    hypercalls: Vec<(u64, HandlerSpec)>,
    /// Like --hypercall, for a standard KVM_HC_* number.
    #[arg(long = "override", value_name = "NR=HANDLER", value_parser = crate::handlers::parse_assignment)]
    overrides: Vec<(u64, HandlerSpec)>,
    /// Re-run this guest (with the recorded memory, vCPUs, command line and options) and
    /// compare its hypercalls with the recording, vCPU by vCPU.
    #[arg(long, value_name = "GUEST")]
    guest: Option<PathBuf>,
    /// Backend of the re-run (--guest): kvm, emu or auto.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "emu"])]
    backend: String,
    /// How the KVM backend traps hypercalls in the re-run (docs/kvm-backend.md).
    #[arg(long, default_value = "auto", value_name = "STRATEGY", value_parser = ["auto", "rewrite", "ud", "hwbp", "xen"])]
    trap: String,
    /// Stop the re-run after this long; 0 or none for no limit.
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = crate::parse::timeout)]
    timeout: crate::parse::Timeout,
    /// Per-call deadline of exec: handlers.
    #[arg(long, default_value = "1s", value_name = "DUR", value_parser = crate::parse::deadline)]
    exec_deadline: Duration,
    /// Print at most N changed calls (0: all); the totals always count them all.
    #[arg(long, default_value_t = 0, value_name = "N")]
    limit: usize,
}

/// `vmcall stats`'s options.
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// The recording; `-` reads it from stdin.
    file: PathBuf,
    /// `nr`: per hypercall number; `vcpu`: per vCPU, then number (as `--stats=vcpu`).
    #[arg(long, default_value = "nr", value_parser = ["nr", "vcpu"])]
    view: String,
}

/// A recorder for `vmcall run --record PATH` (`-`: stdout), its file created now.
pub fn recorder(path: &Path) -> Result<Arc<Recorder>, String> {
    let out: Box<dyn std::io::Write + Send> = if path == Path::new("-") {
        Box::new(std::io::stdout())
    } else {
        let f = std::fs::File::create(path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Box::new(std::io::BufWriter::with_capacity(1 << 16, f))
    };
    Ok(Arc::new(Recorder::create(out)))
}

/// The header of a recording of a run with these settings.
pub(crate) fn header(
    a: &crate::VmArgs,
    backend: &str,
    backend_detail: String,
    guest: &str,
    cmdline: &str,
    table: &HypercallTable,
) -> Header {
    Header {
        backend_detail,
        cmdline: cmdline.into(),
        memory: a.memory,
        vcpus: a.vcpus,
        boot: a.boot.clone(),
        foreign_hypercall: a.foreign_hypercall.clone(),
        pv_features: u64::from(a.pv_features.unwrap_or(vmcall_vmm::x86::cpuid::PV_FEATURES)),
        enforce_pv_cpuid: a.enforce_pv_cpuid,
        table: Header::table_of(table),
        ..Header::new(backend, guest)
    }
}

/// How a run ended, as a recording's end line says it.
pub fn outcome(result: &Result<RunStatus, RunError>) -> String {
    match result {
        Ok(RunStatus::Exited(s)) => format!("exited {s}"),
        Ok(RunStatus::AllHalted) => "halted".into(),
        Ok(RunStatus::Stopped) => "stopped".into(),
        Err(RunError::Timeout(_)) => "timeout".into(),
        Err(e) => format!("error: {e}"),
    }
}

/// The recording at `path` (`-`: stdin), its header read.
fn open_recording(path: &Path) -> Result<RecordingReader<Box<dyn BufRead + Send>>, String> {
    let name = path.display();
    let input: Box<dyn BufRead + Send> = if path == Path::new("-") {
        Box::new(BufReader::with_capacity(1 << 16, std::io::stdin()))
    } else {
        let f = std::fs::File::open(path).map_err(|e| format!("cannot read {name}: {e}"))?;
        Box::new(BufReader::with_capacity(1 << 16, f))
    };
    RecordingReader::new(input).map_err(|e| format!("{name}: {}", crate::chain(&e)))
}

fn read_error(path: &Path, e: &record::RecordError) -> String {
    format!("{}: {}", path.display(), crate::chain(e))
}

/// The table a replay answers with: the recorded one, rebuilt from its handler specs (the
/// demo's own handlers for a recording of `vmcall demo`), with --hypercall/--override on top.
fn replay_table(
    h: &Header,
    args: &ReplayArgs,
    opts: &BuildOptions,
) -> Result<HypercallTable, String> {
    let demo = matches!(h.guest.as_str(), "demo" | "hcloop");
    let table = if demo { crate::demo_table() } else { HypercallTable::new() };
    let replaced = |nr: u64| args.hypercalls.iter().chain(&args.overrides).any(|(n, _)| *n == nr);
    for e in &h.table {
        if replaced(e.nr) || (demo && table.get(e.nr).is_some_and(|t| *t.name == *e.name)) {
            continue;
        }
        let spec = match e.name.parse::<HandlerSpec>() {
            Ok(spec) if e.kind != "native" => spec,
            _ => {
                return Err(format!(
                    "hypercall {:#x}'s recorded handler '{}' ({}) cannot be rebuilt from the \
                     recording: give one with --hypercall {}=HANDLER",
                    e.nr, e.name, e.kind, e.nr
                ))
            }
        };
        let handler = spec.build(e.nr, opts);
        if e.overrides_standard {
            table.override_shared(e.nr, &e.name, handler);
        } else {
            table.set(e.nr, &e.name, handler).map_err(|err| err.to_string())?;
        }
    }
    for (nr, spec) in &args.hypercalls {
        table
            .set(*nr, &spec.to_string(), spec.build(*nr, opts))
            .map_err(|e| format!("--hypercall {nr}={spec}: {e} (use --override)"))?;
    }
    for (nr, spec) in &args.overrides {
        table.override_shared(*nr, &spec.to_string(), spec.build(*nr, opts));
    }
    Ok(table)
}

/// `0x8` or `-0x3e8 (-KVM_ENOSYS)`: a result as the guest sees it.
fn result_text(v: u64) -> String {
    let s = v as i64;
    if (-4095..0).contains(&s) {
        let name = vmcall_abi::errno::ALL.iter().find(|(_, code)| *code == -s).map(|(n, _)| *n);
        match name {
            Some(n) => format!("-{:#x} (-KVM_{n})", -s),
            None => format!("-{:#x}", -s),
        }
    } else {
        format!("{v:#x}")
    }
}

fn by_text(by: Option<AnsweredBy>, handler: Option<&str>) -> String {
    match (handler, by) {
        (Some(h), _) => h.to_string(),
        (None, Some(b)) => b.name().to_string(),
        (None, None) => "?".into(),
    }
}

fn call_text(c: &CallEntry) -> String {
    let [a0, a1, a2, a3] = c.args;
    format!(
        "nr {:#x} args {a0:#x} {a1:#x} {a2:#x} {a3:#x} cpl {} mode {} rip {:#x} -> {} by {}",
        c.nr,
        c.cpl,
        c.mode,
        c.rip,
        result_text(c.result),
        by_text(c.answered_by(), c.handler.as_deref())
    )
}

/// `vmcall replay`.
pub fn replay(args: &ReplayArgs) -> Result<ExitCode, String> {
    let mut reader = open_recording(&args.file)?;
    let opts = BuildOptions { exec_deadline: args.exec_deadline };
    let table = Arc::new(replay_table(reader.header(), args, &opts)?);
    let code = match &args.guest {
        None => replay_without_guest(&mut reader, &table, args),
        Some(guest) => rerun(reader, guest, table.clone(), args),
    }?;
    for nr in table.numbers() {
        table.unregister(nr); // ends exec: processes now
    }
    Ok(ExitCode::from(code))
}

fn print_replay_header(args: &ReplayArgs, h: &Header, calls: u64, ended: bool) {
    println!(
        "replay of {}: {} calls recorded on {} by vmcall {} ({}{})",
        args.file.display(),
        calls,
        h.backend,
        h.vmcall,
        h.guest,
        if ended { "" } else { ", cut short: no end line" },
    );
}

/// Replay the calls as they are read. The first line of the output counts them, so the lines
/// of changed calls (at most --limit) wait for the end of the recording; nothing else does.
fn replay_without_guest(
    reader: &mut RecordingReader<Box<dyn BufRead + Send>>,
    table: &HypercallTable,
    args: &ReplayArgs,
) -> Result<u8, String> {
    let limit = args.limit;
    let replayer = record::Replayer::new(reader.header(), table).map_err(|e| crate::chain(&e))?;
    let (mut total, mut same, mut changed, mut memory) = (0usize, 0usize, 0usize, 0usize);
    let mut per_nr: std::collections::BTreeMap<u64, (usize, usize)> = Default::default();
    let mut memory_nrs = std::collections::BTreeSet::new();
    let mut shown = String::new();
    for c in reader.by_ref() {
        let c = c.map_err(|e| read_error(&args.file, &e))?;
        total += 1;
        let slot = per_nr.entry(c.nr).or_default();
        slot.0 += 1;
        match replayer.verdict(&c) {
            Verdict::Same => same += 1,
            Verdict::NeedsGuestMemory => {
                memory += 1;
                memory_nrs.insert(c.nr);
            }
            Verdict::Changed { result, by, handler } => {
                slot.1 += 1;
                changed += 1;
                if limit == 0 || changed <= limit {
                    let [a0, a1, a2, a3] = c.args;
                    let _ = writeln!(
                        shown,
                        "changed seq {} vcpu {} nr {:#x} args {a0:#x} {a1:#x} {a2:#x} {a3:#x}: \
                         recorded {} by {}, replayed {} by {}",
                        c.seq,
                        c.vcpu,
                        c.nr,
                        result_text(c.result),
                        by_text(c.answered_by(), c.handler.as_deref()),
                        result_text(result),
                        by_text(Some(by), handler.as_deref()),
                    );
                }
            }
        }
    }
    print_replay_header(args, reader.header(), total as u64, reader.end().is_some());
    print!("{shown}");
    let shown = if limit == 0 { changed } else { changed.min(limit) };
    if shown < changed {
        println!("... and {} more changed calls (--limit {limit})", changed - shown);
    }
    for (nr, (n, ch)) in &per_nr {
        if *ch > 0 {
            println!("nr {nr:#x}: {ch} of {n} calls changed");
        }
    }
    if memory > 0 {
        let nrs: Vec<String> = memory_nrs.iter().map(|nr| format!("{nr:#x}")).collect();
        println!(
            "needs guest memory: {memory} calls (nr {}) not replayable without --guest",
            nrs.join(", ")
        );
    }
    println!("total: {total} calls, {same} same, {changed} changed, {memory} not replayed");
    Ok(if changed > 0 { EXIT_DIFFERS } else { 0 })
}

/// Re-run `guest` as the recording's run was set up, on `args.backend`, and compare its calls
/// with the recording's as they are made (reading the recording only as far as the re-run has
/// got: `record::StreamComparer`).
fn rerun(
    reader: RecordingReader<Box<dyn BufRead + Send>>,
    guest: &Path,
    table: Arc<HypercallTable>,
    args: &ReplayArgs,
) -> Result<u8, String> {
    let h = &reader.header().clone();
    let image = crate::guest_file::read(guest, crate::guest_file::image_limit(h.memory))
        .map_err(|e| crate::chain(&e))?;
    let hv = crate::backends::select(&args.backend, &args.trap).map_err(|e| crate::chain(&e))?;
    let sink = Arc::new(
        StreamComparer::new(reader)
            .map_err(|e| format!("cannot start reading the recording: {e}"))?,
    );
    // An exec: handler starts its process from a vCPU thread, which a seccomp filter would
    // forbid (as `vmcall run` does, see seccomp_mode in main.rs).
    let exec = table.list().iter().any(|l| l.kind == "exec");
    if exec {
        eprintln!(
            "vmcall: warning: vCPU threads run without seccomp filters: an exec: handler starts \
             processes from them (docs/security.md)"
        );
    }
    let vm = VmBuilder::new(image)
        .memory(h.memory)
        .vcpus(h.vcpus)
        .timeout(args.timeout.0)
        .cmdline(h.cmdline.clone())
        .boot(h.boot.parse()?)
        .foreign_hypercall(h.foreign_hypercall.parse()?)
        .pv_cpuid(PvCpuid {
            features: u32::try_from(h.pv_features)
                .map_err(|_| "the recorded PV features do not fit in 32 bits".to_string())?,
            enforce: h.enforce_pv_cpuid,
        })
        .image_name(guest.display().to_string())
        .table(table)
        .trace(TraceSwitch::new(false))
        // The guest's console goes to stderr: stdout is the comparison.
        .console(Box::new(std::io::stderr()))
        .sink(sink.clone())
        .seccomp(if exec { Seccomp::Off } else { Seccomp::VcpuThreads })
        .build(hv.as_ref())
        .map_err(|e| crate::chain(&e))?;
    sink.watch(vm.monitor());
    crate::note!("vmcall: re-running {} on the {}", guest.display(), vm.describe());
    let report = vm.run();
    let outcome = outcome(&report.result);
    let rec = sink.finish().map_err(|e| read_error(&args.file, &e))?;
    print_replay_header(args, &rec.header, rec.recorded_calls, rec.end.is_some());
    println!("re-run on {}: {} calls, {outcome}", hv.name(), rec.rerun_calls);
    let divergences = rec.divergences;
    let mut differs = !divergences.is_empty();
    if let Some(d) = divergences.first() {
        println!("first divergence: vCPU {}, its call #{} (counting from 0)", d.vcpu, d.index);
        let side = |c: &Option<CallEntry>, none: &str| match c {
            Some(c) => format!("seq {}: {}", c.seq, call_text(c)),
            None => none.to_string(),
        };
        println!("  recorded: {}", side(&d.recorded, "no more calls on this vCPU"));
        println!("  re-run:   {}", side(&d.rerun, "no more calls on this vCPU"));
        if divergences.len() > 1 {
            let others: Vec<String> = divergences[1..]
                .iter()
                .map(|d| format!("{} (call #{})", d.vcpu, d.index))
                .collect();
            println!("also diverged: vCPU {}", others.join(", vCPU "));
        }
    }
    if let Some(end) = &rec.end {
        if end.outcome != outcome {
            differs = true;
            println!("outcome: recorded {}, re-run {outcome}", end.outcome);
        }
    }
    println!(
        "total: {} calls recorded, {} re-run; {}",
        rec.recorded_calls,
        rec.rerun_calls,
        if differs { "the streams differ" } else { "the same stream, call for call" }
    );
    Ok(if differs { EXIT_DIFFERS } else { 0 })
}

/// `vmcall stats`: per-vCPU statistics of a recording, as a run would have counted them,
/// taken call by call as the recording is read.
pub fn stats(args: &StatsArgs) -> Result<ExitCode, String> {
    let mut reader = open_recording(&args.file)?;
    let mut per_vcpu = vec![VcpuStats::default(); reader.header().vcpus as usize];
    let base = vmcall_vmm::stats::Stamp::now();
    let mut names: std::collections::HashMap<String, Arc<str>> = Default::default();
    let mut last_ns = 0;
    for c in reader.by_ref() {
        let c = c.map_err(|e| read_error(&args.file, &e))?;
        if per_vcpu.len() <= c.vcpu as usize {
            per_vcpu.resize(c.vcpu as usize + 1, VcpuStats::default());
        }
        let s = &mut per_vcpu[c.vcpu as usize];
        s.exit(vmcall_abi::ExitReason::Hypercall);
        s.hypercall(
            c.nr,
            base + Duration::from_nanos(c.time_ns),
            Duration::from_nanos(c.latency_ns),
        );
        if let Some(h) = &c.handler {
            let name = match names.get(h) {
                Some(n) => n.clone(),
                None => names.entry(h.clone()).or_insert_with(|| h.as_str().into()).clone(),
            };
            s.answered_by(c.nr, &name);
        }
        last_ns = c.time_ns;
    }
    let elapsed = Duration::from_nanos(reader.end().map_or(last_ns, |e| e.elapsed_ns));
    let h = reader.header();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "recording {}: {} on {} ({} vCPU{}), vmcall {}",
        args.file.display(),
        h.guest,
        h.backend,
        h.vcpus,
        if h.vcpus == 1 { "" } else { "s" },
        h.vmcall
    );
    out += &crate::report::stats_text(&per_vcpu, elapsed, args.view == "vcpu", None, false);
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}
