//! The vCPU threads of one run: each starts confined by its seccomp filter before the guest
//! runs, ends the run with an error naming it if it panics, and is stopped and collected when
//! the run ends — all of them that stop, that is: a thread held by a handler that never
//! returns is left behind after a grace period rather than hang the caller of `Vm::run`.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use seccompiler::BpfProgram;

use super::{vcpu_loop, RunError, Shared};
use crate::backend::{Interrupter, Vcpu};
use crate::seccomp;
use crate::stats::VcpuStats;

/// How soon a stopping VM re-sends interrupts to vCPUs that are still running: first after
/// 5 ms, then twice as long each time, up to 200 ms. Backing off matters: a KVM kick is a
/// real-time signal, and those queue; a thread starved of CPU on a loaded machine would
/// otherwise come back to hundreds of them, each a trip through its handler (found by the
/// soak run).
const INTERRUPT_RETRY: Duration = Duration::from_millis(5);
const INTERRUPT_RETRY_MAX: Duration = Duration::from_millis(200);

/// Which vCPU threads have finished, so the VM can wait for them without polling.
struct Done {
    done: Mutex<Vec<bool>>,
    cv: Condvar,
}

impl Done {
    /// Wait up to `timeout` for every thread to finish; whether they all have.
    fn wait_all(&self, timeout: Duration) -> bool {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (done, _) = self
            .cv
            .wait_timeout_while(done, timeout, |d| d.iter().any(|done| !done))
            .unwrap_or_else(|p| p.into_inner());
        done.iter().all(|d| *d)
    }

    fn is_done(&self, id: usize) -> bool {
        self.done.lock().unwrap_or_else(|p| p.into_inner())[id]
    }
}

/// Marks one vCPU thread finished when dropped (also when the thread unwinds).
struct Finished<'a>(&'a Done, usize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.done.lock().unwrap_or_else(|p| p.into_inner())[self.1] = true;
        self.0.cv.notify_all();
    }
}

/// The running vCPU threads of a VM.
pub(crate) struct Threads {
    handles: Vec<JoinHandle<VcpuStats>>,
    done: Arc<Done>,
    interrupters: Arc<Mutex<Vec<Arc<dyn Interrupter>>>>,
}

impl Threads {
    /// One thread per vCPU, named `vcpuN`, each installing `filter` before anything else.
    /// A thread that cannot be started ends the run with an error (and no more are started).
    pub(crate) fn start(
        vcpus: Vec<Box<dyn Vcpu>>,
        shared: &Arc<Shared>,
        filter: Option<Arc<BpfProgram>>,
    ) -> Self {
        let done = Arc::new(Done { done: Mutex::new(vec![true; vcpus.len()]), cv: Condvar::new() });
        let interrupters: Arc<Mutex<Vec<Arc<dyn Interrupter>>>> = Arc::default();
        let mut handles = Vec::new();
        for (id, vcpu) in vcpus.into_iter().enumerate() {
            let vcpu_id = id as u32;
            done.done.lock().unwrap_or_else(|p| p.into_inner())[id] = false;
            let (shared, done, interrupters, filter) =
                (shared.clone(), done.clone(), interrupters.clone(), filter.clone());
            let (shared_here, done_here) = (shared.clone(), done.clone());
            let spawned = std::thread::Builder::new().name(format!("vcpu{id}")).spawn(move || {
                let _finished = Finished(&done, id);
                // Everything the thread does is inside: a panic anywhere (the backend's
                // interrupter too) ends the run naming this vCPU, never leaves it waiting.
                let body = || {
                    // Confined before the guest runs a single instruction.
                    if let Some(Err(source)) = filter.as_deref().map(seccomp::install) {
                        let thread = format!("vCPU {id}");
                        shared.finish(Err(RunError::Seccomp { thread, source }));
                        return VcpuStats::default();
                    }
                    let interrupter = vcpu.interrupter();
                    interrupters.lock().unwrap_or_else(|p| p.into_inner()).push(interrupter);
                    vcpu_loop(vcpu_id, vcpu, &shared)
                };
                match catch_unwind(AssertUnwindSafe(body)) {
                    Ok(stats) => stats,
                    Err(payload) => {
                        let message = panic_message(payload.as_ref());
                        shared.finish(Err(RunError::VcpuPanicked { vcpu: vcpu_id, message }));
                        VcpuStats::default()
                    }
                }
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(source) => {
                    done_here.done.lock().unwrap_or_else(|p| p.into_inner())[id] = true;
                    shared_here.finish(Err(RunError::Thread { vcpu: vcpu_id, source }));
                    break;
                }
            }
        }
        Self { handles, done, interrupters }
    }

    /// After the run has ended: interrupt every vCPU still inside the backend (again and
    /// again, since an interrupt that lands just before a vCPU re-enters the backend can be
    /// missed) until all threads have finished or `deadline` (if any) has passed. Returns the
    /// merged statistics of the threads that finished, each vCPU's by id (empty for a thread
    /// left behind), and the ids of those left running.
    pub(crate) fn stop(self, deadline: Option<Instant>) -> (VcpuStats, Vec<VcpuStats>, Vec<u32>) {
        let mut retry = INTERRUPT_RETRY;
        let left = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        while !self.done.wait_all(Duration::ZERO) && left().is_none_or(|l| !l.is_zero()) {
            for i in self.interrupters.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                i.interrupt();
            }
            self.done.wait_all(left().map_or(retry, |l| retry.min(l)));
            retry = (retry * 2).min(INTERRUPT_RETRY_MAX);
        }
        let mut stats = VcpuStats::default();
        let mut per_vcpu = Vec::new();
        let mut stuck = Vec::new();
        for (id, handle) in self.handles.into_iter().enumerate() {
            if !self.done.is_done(id) {
                // Held by a handler that does not return, or by a backend that ignores
                // interrupts: the thread is detached and keeps what it holds alive.
                stuck.push(id as u32);
                per_vcpu.push(VcpuStats::default());
                continue;
            }
            // It has finished (panics were caught inside), so this returns at once.
            let s = handle.join().unwrap_or_default();
            stats.merge(&s);
            per_vcpu.push(s);
        }
        (stats, per_vcpu, stuck)
    }
}

/// The message of a panic payload (`panic!` with a literal or with formatting).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}
