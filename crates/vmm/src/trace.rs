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
    pub vcpu: u32,
    /// The number after truncation.
    pub nr: u64,
    /// a0..a3 after truncation.
    pub args: [u64; 4],
    /// The value written to RAX.
    pub ret: u64,
    pub cpl: u8,
    pub mode: CpuMode,
    /// Address of the hypercall instruction.
    pub rip: u64,
    pub answered_by: AnsweredBy,
    /// The custom handler that answered, by its name at the time of the call.
    pub handler: Option<&'a str>,
    /// Host handling time of the call (emulation and handler).
    pub latency_ns: u64,
}

/// Receives every hypercall of a VM, on the vCPU thread that made it, after it is answered
/// (before the vCPU resumes): keep it quick.
pub trait CallSink: Send + Sync + 'static {
    fn record(&self, call: &CallRecord<'_>);
}

/// A value as the guest sees a result: `0x2a`, or `-0x3e8` for a negative one (an error).
#[derive(Debug, Clone, Copy)]
pub struct SignedHex(pub u64);

impl std::fmt::Display for SignedHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 as i64 {
            v if v < 0 => write!(f, "-{:#x}", v.unsigned_abs()),
            _ => write!(f, "{:#x}", self.0),
        }
    }
}

/// Several sinks, each given every call in turn (e.g. a JSON trace and a recording).
pub struct Fanout(pub Vec<Arc<dyn CallSink>>);

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fanout({} sinks)", self.0.len())
    }
}

impl CallSink for Fanout {
    fn record(&self, call: &CallRecord<'_>) {
        for sink in &self.0 {
            sink.record(call);
        }
    }
}

/// Turns the text trace (one `tracing` event per call, target `vmcall::hypercall`) on and off
/// while a VM runs. Clones share one switch.
#[derive(Debug, Clone)]
pub struct TraceSwitch(Arc<AtomicBool>);

impl TraceSwitch {
    pub fn new(on: bool) -> Self {
        Self(Arc::new(AtomicBool::new(on)))
    }
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
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
