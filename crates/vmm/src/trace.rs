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

/// How many calls [`RecentCalls`] keeps per vCPU.
pub const RECENT_CALLS: usize = 8;

/// One hypercall, as a fault report lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecentCall {
    /// The number after truncation.
    pub nr: u64,
    /// a0..a3 after truncation.
    pub args: [u64; 4],
    /// The value written to RAX.
    pub ret: u64,
    /// Address of the hypercall instruction.
    pub rip: u64,
}

/// The last [`RECENT_CALLS`] hypercalls of one vCPU: a ring its thread writes on every call
/// (a few stores, no lock), read when a guest fault ends the run.
#[derive(Debug, Clone, Default)]
pub struct RecentCalls {
    ring: [RecentCall; RECENT_CALLS],
    /// Calls pushed so far.
    pushed: u64,
}

impl RecentCalls {
    /// Remember `call`, forgetting the oldest one if the ring is full.
    #[inline]
    pub fn push(&mut self, call: RecentCall) {
        self.ring[(self.pushed % RECENT_CALLS as u64) as usize] = call;
        self.pushed += 1;
    }

    /// The calls kept, oldest first.
    pub fn oldest_first(&self) -> Vec<RecentCall> {
        let n = self.pushed.min(RECENT_CALLS as u64);
        (self.pushed - n..self.pushed)
            .map(|i| self.ring[(i % RECENT_CALLS as u64) as usize])
            .collect()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_last_calls_oldest_first() {
        let mut r = RecentCalls::default();
        assert!(r.oldest_first().is_empty());
        let call = |nr| RecentCall { nr, ..Default::default() };
        r.push(call(1));
        r.push(call(2));
        assert_eq!(r.oldest_first(), vec![call(1), call(2)]);
        for nr in 3..=20 {
            r.push(call(nr));
        }
        let nrs: Vec<u64> = r.oldest_first().iter().map(|c| c.nr).collect();
        assert_eq!(nrs, (21 - RECENT_CALLS as u64..=20).collect::<Vec<_>>());
    }

    #[test]
    fn results_print_as_the_guest_sees_them() {
        assert_eq!(SignedHex(0x2a).to_string(), "0x2a");
        assert_eq!(SignedHex(crate::hypercall::neg(1000)).to_string(), "-0x3e8");
        assert_eq!(SignedHex(1 << 63).to_string(), "-0x8000000000000000");
    }
}
