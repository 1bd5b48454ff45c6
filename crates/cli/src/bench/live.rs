//! `vmcall bench`'s lines for live handlers: an `exec:` handler's round trip (the documented
//! Python example), and the time from a control-socket `set` to the first call the new handler
//! answers.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmcall_vmm::backend::Hypervisor;
use vmcall_vmm::hypercall::handlers::Builtin;
use vmcall_vmm::hypercall::HypercallTable;
use vmcall_vmm::seccomp::Seccomp;
use vmcall_vmm::stats::Latency;
use vmcall_vmm::trace::{CallRecord, CallSink};
use vmcall_vmm::vm::{RunStatus, VmBuilder};

use super::{image, BENCH_NR, RAM};
use crate::control::server::ControlServer;
use crate::control::VmTarget;
use crate::handlers::{BuildOptions, ExecHandler};

/// The exec handler of docs/hypercalls.md (`double.py` links to examples/handlers/double.py, so
/// that the packaged crate carries a copy).
const SCRIPT: &str = include_str!("double.py");

/// A file holding the example handler, and the command that runs it, if python3 answers.
pub(super) fn python_handler() -> Result<(std::path::PathBuf, String), String> {
    let path = std::env::temp_dir().join(format!("vmcall-bench-double-{}.py", std::process::id()));
    std::fs::write(&path, SCRIPT).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    let cmd = format!("python3 {}", path.display());
    let probe = std::process::Command::new("sh")
        .args(["-c", &format!("echo '{{\"nr\":20,\"args\":[21,0,0,0]}}' | {cmd}")])
        .output()
        .map_err(|e| format!("cannot run sh: {e}"))?;
    if String::from_utf8_lossy(&probe.stdout).trim() != "{\"ret\": 42}" {
        return Err("python3 does not run the example handler here".into());
    }
    Ok((path, cmd))
}

/// Round trips of `n` calls answered by the exec handler `cmd`.
pub(super) fn exec_run(
    hv: &dyn Hypervisor,
    cmd: &str,
    n: u64,
    lat: &mut Latency,
) -> Result<(), String> {
    let table = Arc::new(HypercallTable::new());
    let handler = ExecHandler::new(BENCH_NR, cmd, Duration::from_secs(5));
    table.register(BENCH_NR, "exec", handler).expect("empty table");
    let refused = Arc::new(Refused::default());
    // As `vmcall run` does for exec: handlers: a vCPU thread's seccomp filter would keep it
    // from starting the handler's process, and every call would time a refusal.
    let report = super::bench_vm_builder(image().to_vec(), &format!("hc {n} {BENCH_NR}"), table)
        .seccomp(Seccomp::Off)
        .sink(refused.clone())
        .build(hv)
        .map_err(|e| crate::chain(&e))?
        .run();
    let refused = refused.0.load(Ordering::Relaxed);
    if refused > 0 {
        return Err(format!(
            "the exec handler did not answer {refused} of {n} calls (-KVM_EFAULT): is `{cmd}` \
             runnable here?"
        ));
    }
    match report.result {
        Ok(RunStatus::Exited(0)) => {
            // (The first round trip includes starting Python: an outlier the median ignores.)
            lat.merge(&report.stats.round_trip);
            Ok(())
        }
        other => Err(format!("bench guest ended with {other:?}")),
    }
}

/// Counts the calls a failing handler answered with -KVM_EFAULT.
#[derive(Default)]
struct Refused(AtomicU64);

impl CallSink for Refused {
    fn record(&self, c: &CallRecord<'_>) {
        if c.ret == (-vmcall_abi::errno::KVM_EFAULT) as u64 {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Records when the value the guest gets changes (set just before the new value is published).
#[derive(Default)]
struct Changes {
    value: AtomicU64,
    at: Mutex<Option<Instant>>,
}

impl CallSink for Changes {
    fn record(&self, c: &CallRecord<'_>) {
        if self.value.load(Ordering::Relaxed) != c.ret {
            *self.at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            self.value.store(c.ret, Ordering::Release);
        }
    }
}

/// `swaps` times: the time from writing `set 20=const:V` to the control socket of a VM whose
/// guest calls 20 in a loop, to the first call answered V (host side), into `lat`.
pub(super) fn ctl_set(hv: &dyn Hypervisor, swaps: u32, lat: &mut Latency) -> Result<(), String> {
    let table = Arc::new(HypercallTable::new());
    table.register(BENCH_NR, "const:1", Builtin::Const(1)).expect("empty table");
    let changes = Arc::new(Changes::default());
    let vm = VmBuilder::new(image().to_vec())
        .memory(RAM)
        .cmdline(format!("hc {} {BENCH_NR}", u64::MAX / 2))
        .table(table)
        .timeout(Some(Duration::from_secs(120)))
        .console(Box::new(std::io::sink()))
        .sink(changes.clone())
        .build(hv)
        .map_err(|e| crate::chain(&e))?;
    let monitor = vm.monitor();
    let path = std::env::temp_dir().join(format!("vmcall-bench-{}.sock", std::process::id()));
    let target = Arc::new(VmTarget { monitor: monitor.clone(), opts: BuildOptions::default() });
    let server = ControlServer::start(&path, target).map_err(|e| crate::chain(&e))?;
    let runner = std::thread::spawn(move || vm.run());
    let result = (|| {
        let wait_for = |v: u64| -> Result<Instant, String> {
            let deadline = Instant::now() + Duration::from_secs(10);
            while changes.value.load(Ordering::Acquire) != v {
                if Instant::now() > deadline {
                    return Err(format!("no call answered {v} within 10 s"));
                }
                std::thread::yield_now();
            }
            Ok(changes.at.lock().unwrap_or_else(|p| p.into_inner()).expect("set before value"))
        };
        wait_for(1)?;
        let mut conn = UnixStream::connect(&path).map_err(|e| e.to_string())?;
        let mut replies = BufReader::new(conn.try_clone().map_err(|e| e.to_string())?);
        for i in 0..swaps {
            let v = if i % 2 == 0 { 2 } else { 1 };
            let line = format!("{{\"cmd\":\"set\",\"nr\":{BENCH_NR},\"handler\":\"const:{v}\"}}\n");
            let t0 = Instant::now();
            conn.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
            let first = wait_for(v)?;
            lat.record(first.saturating_duration_since(t0).as_nanos() as u64);
            let mut reply = String::new();
            replies.read_line(&mut reply).map_err(|e| e.to_string())?;
            if !reply.contains("\"ok\":true") {
                return Err(format!("set failed: {reply}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    })();
    monitor.stop();
    let _ = runner.join();
    drop(server);
    result
}
