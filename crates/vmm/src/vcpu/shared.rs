//! What the vCPU threads of one VM share: the console, HLT/kick coordination, the stop flag
//! and how the run ended.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use super::{RunError, RunStatus};
use crate::debug::DebugHub;
use crate::devices::Devices;
use crate::hypercall::HypercallTable;
use crate::memory::GuestRam;
use crate::stats::VcpuStats;
use crate::trace::{CallSink, RecentCall, RecentCalls, TraceSwitch};
use crate::x86::cpuid::PvCpuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HaltState {
    Running,
    Halted,
}

struct Halts {
    state: Vec<HaltState>,
    /// A kick that arrived while the vCPU was running: its next HLT returns at once.
    pending_kick: Vec<bool>,
    halted: u32,
}

/// State shared by all vCPU threads of one VM.
#[allow(missing_debug_implementations)]
pub struct Shared {
    pub ram: Arc<GuestRam>,
    pub table: Arc<HypercallTable>,
    pub vcpu_count: u32,
    /// The guest's PV CPUID, for hypercalls gated on it.
    pub pv: PvCpuid,
    pub(crate) devices: Devices,
    halts: Mutex<Halts>,
    halt_cv: Condvar,
    stop: AtomicBool,
    pub(crate) end: Mutex<Option<Result<RunStatus, RunError>>>,
    pub(crate) end_cv: Condvar,
    /// The text trace's switch.
    pub trace: TraceSwitch,
    /// Sees every call, if set.
    pub sink: Option<Arc<dyn CallSink>>,
    /// Each vCPU's statistics as it last published them.
    pub(crate) live: Vec<Mutex<VcpuStats>>,
    /// When the run started.
    pub(crate) started: OnceLock<Instant>,
    /// The last hypercalls of the vCPU whose error ended the run.
    pub(crate) last_calls: Mutex<Option<(u32, Vec<RecentCall>)>>,
    /// The debugger's hold on the vCPUs, when one is attached (`docs/gdb.md`).
    pub(crate) debug: Option<Arc<DebugHub>>,
}

impl Shared {
    pub(crate) fn new(
        ram: Arc<GuestRam>,
        table: Arc<HypercallTable>,
        devices: Devices,
        n: u32,
        pv: PvCpuid,
        trace: TraceSwitch,
        sink: Option<Arc<dyn CallSink>>,
    ) -> Self {
        Self {
            pv,
            trace,
            sink,
            live: (0..n).map(|_| Mutex::default()).collect(),
            started: OnceLock::new(),
            last_calls: Mutex::new(None),
            debug: None,
            ram,
            table,
            vcpu_count: n,
            devices,
            halts: Mutex::new(Halts {
                state: vec![HaltState::Running; n as usize],
                pending_kick: vec![false; n as usize],
                halted: 0,
            }),
            halt_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            end_cv: Condvar::new(),
        }
    }

    /// Publish a copy of vCPU `id`'s statistics for live readers.
    pub(crate) fn publish(&self, id: u32, stats: &VcpuStats) {
        if let Some(slot) = self.live.get(id as usize) {
            slot.lock().unwrap_or_else(|p| p.into_inner()).clone_from(stats);
        }
    }

    /// Every vCPU's statistics as last published.
    pub(crate) fn published(&self) -> Vec<VcpuStats> {
        self.live.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect()
    }

    pub(crate) fn console_write(&self, bytes: &[u8]) {
        self.devices.console().write(bytes);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Record how the run ends (the first report wins) and tell every vCPU to stop.
    /// Keep vCPU `vcpu`'s last hypercalls for the report, if its error is about to end the
    /// run (the run has not ended otherwise already).
    pub(crate) fn note_last_calls(&self, vcpu: u32, recent: &RecentCalls) {
        let end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *self.last_calls.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((vcpu, recent.oldest_first()));
        }
    }

    pub(crate) fn finish(&self, result: Result<RunStatus, RunError>) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        let exited = match &result {
            Ok(status) => Some(status.code()),
            Err(_) => None,
        };
        if end.is_none() {
            *end = Some(result);
        }
        self.stop.store(true, Ordering::Release);
        // After the stop flag: a vCPU the debugger releases must see that the run is over.
        if let Some(debug) = &self.debug {
            debug.ended(exited);
        }
        self.end_cv.notify_all();
        drop(end);
        let _h = self.halts.lock().unwrap_or_else(|p| p.into_inner());
        self.halt_cv.notify_all();
    }

    /// `KVM_HC_KICK_CPU`: wake `apic_id` from HLT, or make its next HLT return at once.
    pub(crate) fn kick(&self, apic_id: u64) {
        let Ok(id) = usize::try_from(apic_id) else { return };
        let mut h = self.halts.lock().unwrap_or_else(|p| p.into_inner());
        match h.state.get(id) {
            Some(HaltState::Halted) => {
                h.state[id] = HaltState::Running;
                h.halted -= 1;
                self.halt_cv.notify_all();
            }
            Some(HaltState::Running) => h.pending_kick[id] = true,
            None => {}
        }
    }

    /// Park a halted vCPU until it is kicked (true) or the VM ends (false).
    pub(crate) fn halt(&self, id: u32) -> bool {
        let id = id as usize;
        let mut h = self.halts.lock().unwrap_or_else(|p| p.into_inner());
        if std::mem::take(&mut h.pending_kick[id]) {
            return true;
        }
        h.state[id] = HaltState::Halted;
        h.halted += 1;
        if h.halted == self.vcpu_count {
            drop(h);
            self.finish(Ok(RunStatus::AllHalted));
            return false;
        }
        while h.state[id] == HaltState::Halted && !self.stopping() {
            h = self.halt_cv.wait(h).unwrap_or_else(|p| p.into_inner());
        }
        !self.stopping()
    }
}
