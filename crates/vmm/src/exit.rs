//! The exit-handler table: one function per [`ExitReason`], like Linux's
//! `kvm_vmx_exit_handlers`. Handlers are free functions over a neutral exit, so every path here
//! runs in unit tests with a scripted vCPU.

use std::cell::RefCell;
use std::time::Instant;

use vmcall_abi::{ports, ExitReason};

use crate::backend::{BackendError, Vcpu, VcpuExit};
use crate::hypercall::{emulate, Platform};
use crate::stats::VcpuStats;
use crate::vm::{RunError, Shared};

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
    /// This vCPU's console line so far: output goes out a whole line at a time, so lines
    /// from different vCPUs never interleave mid-line.
    pub line: &'a mut Vec<u8>,
}

/// A console line longer than this is written out in pieces.
const CONSOLE_LINE_MAX: usize = 4096;

type ExitHandler = fn(&mut ExitContext<'_>, &VcpuExit) -> Result<Flow, RunError>;

/// Indexed by `ExitReason as usize`.
const EXIT_HANDLERS: [ExitHandler; ExitReason::COUNT] = {
    let mut t: [ExitHandler; ExitReason::COUNT] = [handle_unknown; ExitReason::COUNT];
    t[ExitReason::Io as usize] = handle_io;
    t[ExitReason::Hlt as usize] = handle_hlt;
    t[ExitReason::Hypercall as usize] = handle_hypercall;
    t[ExitReason::Shutdown as usize] = handle_shutdown;
    t[ExitReason::Debug as usize] = handle_unknown;
    t[ExitReason::Mmio as usize] = handle_mmio;
    t[ExitReason::Fault as usize] = handle_fault;
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
        VcpuExit::IoOut { port: ports::COM1, data, .. } => {
            ctx.line.push(data as u8);
            if data as u8 == b'\n' || ctx.line.len() >= CONSOLE_LINE_MAX {
                ctx.shared.console_write(ctx.line);
                ctx.line.clear();
            }
            Ok(Flow::Continue)
        }
        VcpuExit::IoOut { port: ports::PORT_EXIT, data, size } => {
            let status = if size >= 4 { data } else { data & ((1 << (8 * u32::from(size))) - 1) };
            Ok(Flow::Exit(status))
        }
        VcpuExit::IoOut { port, size, data } => {
            // An ordinary port write nobody listens to, as on a PC with nothing at that port.
            tracing::debug!(
                vcpu = ctx.vcpu_id,
                port,
                size,
                data,
                "write to an unclaimed port ignored"
            );
            Ok(Flow::Continue)
        }
        VcpuExit::IoIn { port, size } => {
            ctx.vcpu.complete_io_in(port_in(port, size)).map_err(backend(ctx.vcpu_id))?;
            Ok(Flow::Continue)
        }
        _ => unreachable!("dispatched by reason"),
    }
}

/// What a port read returns: COM1's line status says "transmitter empty" (so polling guests
/// never wait), its other registers read 0, and unclaimed ports read all ones as on a PC.
/// Backends that must answer a read synchronously (the emulator) call this too.
pub fn port_in(port: u16, size: u8) -> u32 {
    match port {
        p if p == ports::COM1 + 5 => 0x60,
        p if (ports::COM1..=ports::COM1_END).contains(&p) => 0,
        _ => u32::MAX >> (32 - 8 * u32::from(size.clamp(1, 4))),
    }
}

fn handle_hlt(_: &mut ExitContext<'_>, _: &VcpuExit) -> Result<Flow, RunError> {
    Ok(Flow::Halt)
}

/// The [`Platform`] a hypercall sees: the shared VM state plus this vCPU.
struct VcpuPlatform<'a> {
    shared: &'a Shared,
    vcpu: RefCell<&'a mut dyn Vcpu>,
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
        self.vcpu.borrow_mut().guest_tsc()
    }
}

fn handle_hypercall(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    let VcpuExit::Hypercall(hc) = exit else { unreachable!("dispatched by reason") };
    let start = Instant::now();
    let platform = VcpuPlatform { shared: ctx.shared, vcpu: RefCell::new(&mut *ctx.vcpu) };
    let done = emulate(&ctx.shared.table, hc, ctx.vcpu_id, &ctx.shared.ram, &platform);
    ctx.vcpu.complete_hypercall(done.rax).map_err(backend(ctx.vcpu_id))?;
    ctx.stats.hypercall(done.nr, start.elapsed());
    tracing::trace!(
        target: "vmcall::hypercall",
        vcpu = ctx.vcpu_id,
        nr = done.nr,
        a0 = done.args[0],
        a1 = done.args[1],
        a2 = done.args[2],
        a3 = done.args[3],
        ret = done.rax as i64,
        cpl = hc.cpl,
        mode = hc.mode.name(),
        rip = hc.rip,
        by = ?done.answered_by,
        "hypercall"
    );
    Ok(Flow::Continue)
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
    let VcpuExit::Mmio { gpa, write, len } = *exit else { unreachable!("dispatched by reason") };
    Err(RunError::Unhandled {
        vcpu: ctx.vcpu_id,
        what: format!(
            "{} of {len} bytes at guest-physical {gpa:#x}, which has no RAM or device behind it",
            if write { "write" } else { "read" }
        ),
    })
}

fn handle_unknown(ctx: &mut ExitContext<'_>, exit: &VcpuExit) -> Result<Flow, RunError> {
    match exit {
        VcpuExit::Interrupted => {
            Ok(if ctx.shared.stopping() { Flow::Stop } else { Flow::Continue })
        }
        other => Err(RunError::Unhandled { vcpu: ctx.vcpu_id, what: format!("{other:?}") }),
    }
}
