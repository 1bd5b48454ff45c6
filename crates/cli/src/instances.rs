//! `vmcall run --instances N`: N copies of one guest at once in this process, sharing the
//! hypercall handlers (one table), each with its own RAM and vCPUs (docs/bench.md, "Density").

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use vmcall_vmm::stats::VcpuStats;
use vmcall_vmm::vm::{RunError, RunStatus, RunningVm};

use crate::{backends, chain, run_table, seccomp_mode, vm_builder, VmArgs, EXIT_FAILURE};
use crate::{Error, DEFAULT_TIMEOUT, EXIT_TIMEOUT};

/// Where `{instance}` in the guest's command line is replaced by the instance's number.
pub const INSTANCE_PLACEHOLDER: &str = "{instance}";

/// One instance's console: whole lines to stdout, each prefixed `[i] `, so that the guests'
/// output interleaves line by line and never within a line.
struct Prefixed {
    prefix: String,
    line: Vec<u8>,
}

/// A guest that never ends a line still gets its output shown, in pieces of this size.
const LINE_MAX: usize = 4096;

impl Prefixed {
    fn emit(&mut self) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(self.prefix.as_bytes())?;
        out.write_all(&self.line)?;
        if self.line.last() != Some(&b'\n') {
            out.write_all(b"\n")?;
        }
        self.line.clear();
        out.flush()
    }
}

impl Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= LINE_MAX {
                self.emit()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // The console flushes after every write; a partial line waits for its end (or Drop).
        Ok(())
    }
}

impl Drop for Prefixed {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let _ = self.emit();
        }
    }
}

/// Run `n` instances of `image` and wait for them all. The exit status is that of the first
/// instance (by number) that did not end with 0, mapped as for one VM; stderr names every
/// instance that did not.
pub fn run(
    image: Vec<u8>,
    image_name: &str,
    a: &VmArgs,
    cmdline: String,
    n: u32,
) -> Result<ExitCode, Error> {
    raise_fd_limit();
    let table = run_table(a, None)?;
    let hv = backends::select(&a.backend, &a.trap)?;
    let seccomp = seccomp_mode(a);
    let mut running: Vec<RunningVm> = Vec::new();
    let mut failed_start = None;
    for i in 0..n {
        let line = cmdline.replace(INSTANCE_PLACEHOLDER, &i.to_string());
        let console = Prefixed { prefix: format!("[{i}] "), line: Vec::new() };
        let built = vm_builder(
            image.clone(),
            image_name,
            a,
            line,
            table.clone(),
            DEFAULT_TIMEOUT,
            seccomp,
        )?
        .console(Box::new(console))
        .build(hv.as_ref());
        let vm = match built {
            Ok(vm) => vm,
            Err(e) => {
                failed_start = Some(format!("instance {i}: {}", chain(&e)));
                break;
            }
        };
        if i == 0 {
            eprintln!("vmcall: {n} instances; {}", vm.describe());
        }
        match vm.start() {
            Ok(r) => running.push(r),
            Err(report) => {
                let why = report.result.err().map_or_else(String::new, |e| chain(&e));
                failed_start = Some(format!("instance {i}: {why}"));
                break;
            }
        }
    }
    let stoppers: Vec<_> = running.iter().map(RunningVm::stopper).collect();
    let stop_all = move || stoppers.iter().for_each(|s| s.stop());
    if failed_start.is_some() {
        // Those already running are stopped rather than left to run on alone.
        stop_all();
    }
    let signals = crate::signals::StopOnSignal::install(stop_all)?;
    let started = running.len();
    let mut stats = VcpuStats::default();
    let mut elapsed = Duration::ZERO;
    let mut first_bad: Option<ExitCode> = None;
    let mut bad = 0;
    for (i, vm) in running.into_iter().enumerate() {
        let report = vm.wait();
        stats.merge(&report.stats);
        elapsed = elapsed.max(report.elapsed);
        let (code, what) = match report.result {
            Ok(RunStatus::AllHalted | RunStatus::Stopped) | Ok(RunStatus::Exited(0)) => continue,
            Ok(RunStatus::Exited(s)) => (ExitCode::from(s.min(255) as u8), format!("exit {s}")),
            Err(e @ RunError::Timeout(_)) => (ExitCode::from(EXIT_TIMEOUT), e.to_string()),
            Err(e) => (ExitCode::from(EXIT_FAILURE), chain(&e)),
        };
        eprintln!("vmcall: instance {i}: {what}");
        bad += 1;
        first_bad.get_or_insert(code);
    }
    let interrupted = signals.finish();
    if a.stats.is_some() {
        // The instances' statistics merged: one row per number, as for one VM (a per-vCPU
        // view would mix the vCPUs of different VMs).
        let text = crate::report::stats_text(&[stats], elapsed, false, Some(&table), true);
        eprintln!("vmcall: {started} instances, {text}");
    }
    for nr in table.numbers() {
        table.unregister(nr);
    }
    if let Some(why) = failed_start {
        return Err(Error::Backend(format!(
            "{why} ({started} instances had started and were stopped)"
        )));
    }
    if bad > 0 {
        eprintln!("vmcall: {bad} of {started} instances did not end with 0");
    }
    Ok(match (interrupted, first_bad) {
        (Some(sig), _) => ExitCode::from(128 + sig as u8),
        (None, Some(code)) => code,
        (None, None) => ExitCode::SUCCESS,
    })
}

/// Many VMs need many descriptors (a KVM VM holds a VM fd and one per vCPU): take the hard
/// limit, as servers do; a failure leaves the soft one, and the fleet reports where it stopped.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current < lim.maximum {
        lim.current = lim.maximum;
        let _ = setrlimit(Resource::Nofile, lim);
    }
}
