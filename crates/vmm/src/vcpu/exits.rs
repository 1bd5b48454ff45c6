//! The exit-handler table: one function per [`ExitReason`], like Linux's
//! `kvm_vmx_exit_handlers`. Handlers are free functions over a neutral exit, so every path here
//! runs in unit tests with a scripted vCPU.

use std::cell::RefCell;

use vmcall_abi::ExitReason;

use super::{RunError, Shared};
use crate::backend::{BackendError, InlineExits, Vcpu, VcpuExit};
use crate::debug::{stop_reason, Action, StopReason};
use crate::devices::PortWrite;
use crate::hypercall::{emulate_with, HypercallExit, Platform};
use crate::stats::{Stamp, VcpuStats};
use crate::trace::{CallRecord, RecentCall, RecentCalls};

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Run the vCPU again.
    Continue,
    /// The vCPU executed HLT; the loop parks it until it is kicked or the VM ends.
    Halt,
    /// The guest asked to end the VM with this status.
    Exit(u32),
    /// The VM is being stopped (another vCPU ended it, or the timeout fired).
    Stop,
}

/// Everything an exit handler may touch.
#[allow(missing_debug_implementations)]
pub struct ExitContext<'a> {
    pub vcpu_id: u32,
    pub vcpu: &'a mut dyn Vcpu,
    pub shared: &'a Shared,
    pub stats: &'a mut VcpuStats,
    /// This vCPU's last hypercalls, for fault reports.
    pub recent: &'a mut RecentCalls,
    /// This vCPU's console line so far: output goes out a whole line at a time, so lines
    /// from different vCPUs never interleave mid-line.
    pub line: &'a mut Vec<u8>,
}

type ExitHandler = fn(&mut ExitContext<'_>, &VcpuExit) -> Result<Flow, RunError>;

/// Indexed by `ExitReason as usize`.
const EXIT_HANDLERS: [ExitHandler; ExitReason::COUNT] = {
    let mut t: [ExitHandler; ExitReason::COUNT] = [handle_unknown; ExitReason::COUNT];
    t[ExitReason::Io as usize] = handle_io;
    t[ExitReason::Hlt as usize] = handle_hlt;
    t[ExitReason::Hypercall as usize] = handle_hypercall;
    t[ExitReason::Shutdown as usize] = handle_shutdown;
    t[ExitReason::Debug as usize] = handle_debug;
    t[ExitReason::Mmio as usize] = handle_mmio;
    t[ExitReason::Fault as usize] = handle_fault;
    t[ExitReason::Interrupted as usize] = handle_interrupted;
    t
};

/// Dispatch one exit through the table.
pub fn handle_exit(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    let reason = exit.reason();
    ctx.stats.exit(reason);
    EXIT_HANDLERS[reason as usize](ctx, exit)
}

fn backend(vcpu: u32) -> impl FnOnce(BackendError) -> RunError {
    move |source| RunError::Backend { vcpu, source }
}

fn handle_io(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    match *exit {
        VcpuExit::IoOut { port, size, data } => {
            Ok(match ctx.shared.devices.port_out(ctx.vcpu_id, ctx.line, port, size, data) {
                PortWrite::Done => Flow::Continue,
                PortWrite::Exit(status) => Flow::Exit(status),
                PortWrite::StrayExit { size, data } => {
                    return Err(RunError::StrayExit { vcpu: ctx.vcpu_id, size, data })
                }
            })
        }
        VcpuExit::IoIn { port, size } => {
            let value = ctx.shared.devices.port_in(port, size);
            ctx.vcpu.complete_io_in(value).map_err(backend(ctx.vcpu_id))?;
            Ok(Flow::Continue)
        }
        _ => unreachable!("dispatched by reason"),
    }
}

fn handle_hlt(_: &mut ExitContext<'_>, _: &VcpuExit) -> Result<Flow, RunError> {
    Ok(Flow::Halt)
}

/// The [`Platform`] a hypercall sees: the shared VM state plus this vCPU's TSC.
struct VcpuPlatform<'a> {
    shared: &'a Shared,
    guest_tsc: RefCell<&'a mut dyn FnMut() -> u64>,
}

impl Platform for VcpuPlatform<'_> {
    fn vcpu_count(&self) -> u32 {
        self.shared.vcpu_count
    }
    fn kick_cpu(&self, apic_id: u64) {
        self.shared.kick(apic_id);
    }
    fn yield_to(&self, _apic_id: u64) {
        std::thread::yield_now();
    }
    fn guest_tsc(&self) -> u64 {
        (self.guest_tsc.borrow_mut())()
    }
    fn pv_has(&self, bit: u32) -> bool {
        self.shared.pv.has(bit)
    }
}

/// Answer one hypercall: emulate it, count it, trace it. The one path for hypercall exits
/// and for hypercalls a backend answers inline ([`InlineExits`]).
fn answer_hypercall(
    vcpu_id: u32,
    shared: &Shared,
    stats: &mut VcpuStats,
    recent: &mut RecentCalls,
    hc: &HypercallExit,
    guest_tsc: &mut dyn FnMut() -> u64,
) -> u64 {
    let start = Stamp::now();
    // A trace line and a call record carry each call's latency: then every call is timed.
    let time_it = stats.time_next() || shared.trace.is_on() || shared.sink.is_some();
    let platform = VcpuPlatform { shared, guest_tsc: RefCell::new(guest_tsc) };
    emulate_with(&shared.table, hc, vcpu_id, &shared.ram, &platform, |done, entry| {
        let took = time_it.then(|| start.elapsed());
        match took {
            Some(took) => stats.hypercall(done.nr, start, took),
            None => stats.hypercall_untimed(done.nr, start),
        }
        if let Some(e) = entry {
            stats.answered_by(done.nr, &e.name);
        }
        if shared.trace.is_on() {
            tracing::trace!(
                target: "vmcall::hypercall",
                vcpu = vcpu_id,
                nr = format_args!("{:#x}", done.nr),
                a0 = format_args!("{:#x}", done.args[0]),
                a1 = format_args!("{:#x}", done.args[1]),
                a2 = format_args!("{:#x}", done.args[2]),
                a3 = format_args!("{:#x}", done.args[3]),
                ret = %crate::trace::SignedHex(done.rax),
                cpl = hc.cpl,
                mode = %hc.mode.name(),
                rip = format_args!("{:#x}", hc.rip),
                by = %done.answered_by.name(),
                handler = entry.map(|e| tracing::field::display(&*e.name)),
                "hypercall"
            );
        }
        if let Some(sink) = &shared.sink {
            sink.record(&CallRecord {
                vcpu: vcpu_id,
                nr: done.nr,
                args: done.args,
                ret: done.rax,
                cpl: hc.cpl,
                mode: hc.mode,
                rip: hc.rip,
                answered_by: done.answered_by,
                handler: entry.map(|e| &*e.name),
                latency_ns: took.map_or(0, |t| t.as_nanos() as u64),
            });
        }
        recent.push(RecentCall { nr: done.nr, args: done.args, ret: done.rax, rip: hc.rip });
        if stats.publish_due(start) {
            shared.publish(vcpu_id, stats);
        }
        done.rax
    })
}

fn handle_hypercall(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    let VcpuExit::Hypercall(hc) = exit else { unreachable!("dispatched by reason") };
    if let Some(debug) = ctx.shared.debug.as_ref().filter(|d| d.catches(hc.nr)) {
        // Stop before answering: the debugger sees RIP at the instruction and the number in
        // RAX. The call is answered as it was made when the VM resumes.
        ctx.vcpu.rewind_hypercall().map_err(backend(ctx.vcpu_id))?;
        debug.report(ctx.vcpu_id, StopReason::Hypercall(hc.nr));
        let shared = ctx.shared;
        debug
            .gate(ctx.vcpu_id, &mut *ctx.vcpu, || shared.stopping())
            .map_err(backend(ctx.vcpu_id))?;
        if shared.stopping() {
            return Ok(Flow::Stop);
        }
    }
    // Under a single step the hypercall is the one instruction: the step ends after it,
    // on every backend and whichever way the call reached the loop.
    let step_after =
        ctx.shared.debug.as_ref().is_some_and(|d| d.action(ctx.vcpu_id) == Action::Step);
    let vcpu = &mut *ctx.vcpu;
    let rax = answer_hypercall(ctx.vcpu_id, ctx.shared, ctx.stats, ctx.recent, hc, &mut || {
        vcpu.guest_tsc()
    });
    ctx.vcpu.complete_hypercall(rax).map_err(backend(ctx.vcpu_id))?;
    if let (true, Some(debug)) = (step_after, &ctx.shared.debug) {
        debug.report(ctx.vcpu_id, StopReason::Step);
    }
    Ok(Flow::Continue)
}

fn handle_debug(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    match (exit, &ctx.shared.debug) {
        (VcpuExit::Debugger(stop), Some(debug)) => {
            // The vCPU parks at its next gate, and the others are interrupted.
            debug.report(ctx.vcpu_id, stop_reason(*stop));
            Ok(Flow::Continue)
        }
        _ => handle_unknown(ctx, exit),
    }
}

/// The [`InlineExits`] the vCPU loop hands to each `run`.
pub(crate) struct Inline<'a> {
    pub vcpu_id: u32,
    pub shared: &'a Shared,
    pub stats: &'a mut VcpuStats,
    pub recent: &'a mut RecentCalls,
    pub line: &'a mut Vec<u8>,
}

impl InlineExits for Inline<'_> {
    fn hypercall(&mut self, call: &HypercallExit, guest_tsc: &mut dyn FnMut() -> u64) -> u64 {
        self.stats.exit(ExitReason::Hypercall);
        answer_hypercall(self.vcpu_id, self.shared, self.stats, self.recent, call, guest_tsc)
    }

    fn port_out(&mut self, port: u16, size: u8, data: u32) -> bool {
        match self.shared.devices.port_out(self.vcpu_id, self.line, port, size, data) {
            PortWrite::Done => {
                self.stats.exit(ExitReason::Io);
                false
            }
            // Anything else must reach the vCPU loop: the backend reports it as an exit.
            PortWrite::Exit(_) | PortWrite::StrayExit { .. } => true,
        }
    }

    fn port_in(&mut self, port: u16, size: u8) -> u32 {
        self.stats.exit(ExitReason::Io);
        self.shared.devices.port_in(port, size)
    }

    fn mmio_read(&mut self, gpa: u64, len: u8) -> Option<u64> {
        let v = self.shared.devices.mmio_read(self.vcpu_id, gpa, len)?;
        self.stats.exit(ExitReason::Mmio);
        Some(v)
    }

    fn hypercall_needs_loop(&mut self, call: &HypercallExit) -> bool {
        self.shared.debug.as_ref().is_some_and(|d| d.catches(call.nr))
    }

    fn mmio_write(&mut self, gpa: u64, len: u8, data: u64) -> bool {
        let done = self.shared.devices.mmio_write(self.vcpu_id, gpa, len, data);
        if done {
            self.stats.exit(ExitReason::Mmio);
        }
        done
    }
}

fn handle_shutdown(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    let VcpuExit::Shutdown { rip } = *exit else { unreachable!("dispatched by reason") };
    Err(RunError::TripleFault { vcpu: ctx.vcpu_id, rip })
}

fn handle_fault(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    let VcpuExit::Fault(fault) = *exit else { unreachable!("dispatched by reason") };
    Err(RunError::GuestFault { vcpu: ctx.vcpu_id, fault })
}

fn handle_mmio(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    let VcpuExit::Mmio { gpa, write, len, data } = *exit else {
        unreachable!("dispatched by reason")
    };
    let devices = &ctx.shared.devices;
    let handled = if write {
        devices.mmio_write(ctx.vcpu_id, gpa, len, data)
    } else if let Some(value) = devices.mmio_read(ctx.vcpu_id, gpa, len) {
        ctx.vcpu.complete_mmio_read(value).map_err(backend(ctx.vcpu_id))?;
        true
    } else {
        false
    };
    if handled {
        return Ok(Flow::Continue);
    }
    Err(RunError::UnbackedAccess { vcpu: ctx.vcpu_id, gpa, write, len })
}

/// The host interrupted the vCPU: the run is ending (stop), or it was something else (a
/// signal, an interrupt that came late) and the vCPU runs on. Never an error.
fn handle_interrupted(ctx: &mut ExitContext<'_>, _: &VcpuExit) -> Result<Flow, RunError> {
    Ok(if ctx.shared.stopping() { Flow::Stop } else { Flow::Continue })
}

fn handle_unknown(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    Err(RunError::UnhandledExit { vcpu: ctx.vcpu_id, exit: exit.clone() })
}
