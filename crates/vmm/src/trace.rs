//! Per-call observation: what a [`CallSink`] sees of every hypercall, and the switch for the
//! built-in text trace. Both are checked on the hypercall path, so they cost a load and a
//! branch when off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::hypercall::AnsweredBy;
use crate::x86::CpuMode;

/// One answered hypercall, as a [`CallSink`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct CallRecord<'a> {
    /// The calling vCPU.
    pub vcpu: u32,
    /// The number after truncation.
    pub nr: u64,
    /// a0..a3 after truncation.
    pub args: [u64; 4],
    /// The value written to RAX.
    pub ret: u64,
    /// The caller's privilege level.
    pub cpl: u8,
    /// The caller's CPU mode.
    pub mode: CpuMode,
    /// Address of the hypercall instruction.
    pub rip: u64,
    /// Who answered it.
    pub answered_by: AnsweredBy,
    /// The custom handler that answered, by its name at the time of the call.
    pub handler: Option<&'a str>,
    /// Host handling time of the call (emulation and handler).
    pub latency_ns: u64,
}

/// Receives every hypercall of a VM, on the vCPU thread that made it, after it is answered
/// (before the vCPU resumes): keep it quick.
pub trait CallSink: Send + Sync + 'static {
    /// Record one call (from the vCPU thread that answered it: keep it short).
    fn record(&self, call: &CallRecord<'_>);
}

/// Turns the text trace (one `tracing` event per call, target `vmcall::hypercall`) on and off
/// while a VM runs. Clones share one switch.
#[derive(Debug, Clone)]
pub struct TraceSwitch(Arc<AtomicBool>);

impl TraceSwitch {
    /// A switch, on or off.
    pub fn new(on: bool) -> Self {
        Self(Arc::new(AtomicBool::new(on)))
    }
    /// Turn the trace on or off; vCPUs see the change at their next call.
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
    /// Whether the trace is on.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Default for TraceSwitch {
    /// On: every call emits its event, and the `tracing` subscriber's filter decides.
    fn default() -> Self {
        Self::new(true)
    }
}
