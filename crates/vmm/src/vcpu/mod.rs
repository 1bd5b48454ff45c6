//! The vCPU side of a run: the loop each vCPU thread runs, the exit-handler table it dispatches
//! through, the state vCPUs share (halt and kick, stop, how the run ended) and the outcomes.

mod exits;
mod shared;
mod threads;

use std::time::Duration;

pub(crate) use shared::Shared;
pub(crate) use threads::Threads;

use crate::backend::{BackendError, GuestFault, Vcpu};
use crate::stats::VcpuStats;
use crate::x86::descriptors::exception_name;
use exits::{handle_exit, ExitContext, Flow, Inline};

/// Why a run ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("guest triple fault on vCPU {vcpu} at RIP {rip:#x}")]
    TripleFault { vcpu: u32, rip: u64 },
    #[error("unhandled guest exception on vCPU {vcpu}: {}", describe_fault(fault))]
    GuestFault { vcpu: u32, fault: GuestFault },
    #[error("guest did not finish within {0:?} (--timeout)")]
    Timeout(Duration),
    #[error("vCPU {vcpu}: unhandled exit: {what}")]
    Unhandled { vcpu: u32, what: String },
    #[error(
        "vCPU {vcpu}: {size}-byte write of {data:#x} to the exit port: only a 4-byte write \
         (`out 0xf8, eax`, the SDKs' exit) ends a run, so the guest has gone wrong"
    )]
    StrayExit { vcpu: u32, size: u8, data: u32 },
    #[error("vCPU {vcpu}: its thread panicked: {message}")]
    VcpuPanicked { vcpu: u32, message: String },
    #[error("cannot start the thread of vCPU {vcpu}")]
    Thread { vcpu: u32, source: std::io::Error },
    #[error("cannot confine {thread} with its seccomp filter (--no-seccomp runs without)")]
    Seccomp { thread: String, source: crate::seccomp::SeccompError },
    #[error("vCPU {vcpu}: backend failure")]
    Backend { vcpu: u32, source: BackendError },
}

fn describe_fault(f: &GuestFault) -> String {
    let mut s = format!("{} (vector {}) at RIP {:#x}", exception_name(f.vector), f.vector, f.rip);
    if let Some(code) = f.error_code {
        s += &format!(", error code {code:#x}");
    }
    if let Some(addr) = f.cr2 {
        s += &format!(", address {addr:#x}");
    }
    if f.cs & 3 != 0 {
        s += &format!(", in CPL {} code", f.cs & 3);
    }
    s
}

/// How a run ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Every vCPU halted with nothing left to wake it: status 0.
    AllHalted,
    /// The guest called `exit(status)`.
    Exited(u32),
    /// The host stopped it through a `VmStopper`.
    Stopped,
}

impl RunStatus {
    /// The process exit status this maps to.
    pub fn code(self) -> u32 {
        match self {
            RunStatus::AllHalted | RunStatus::Stopped => 0,
            RunStatus::Exited(s) => s,
        }
    }
}

pub(crate) fn vcpu_loop(id: u32, mut vcpu: Box<dyn Vcpu>, shared: &Shared) -> VcpuStats {
    let mut stats = VcpuStats::default();
    let mut line = Vec::new();
    if let Some(debug) = &shared.debug {
        debug.register(id, vcpu.interrupter(), vcpu.debug_caps());
    }
    while !shared.stopping() {
        if let Some(debug) = &shared.debug {
            // Parks here while a debugger holds the VM (before the first instruction, too).
            if let Err(source) = debug.gate(id, &mut *vcpu, || shared.stopping()) {
                shared.finish(Err(RunError::Backend { vcpu: id, source }));
                break;
            }
            if shared.stopping() {
                break;
            }
        }
        let mut inline = Inline { vcpu_id: id, shared, stats: &mut stats, line: &mut line };
        let exit = match vcpu.run(&mut inline) {
            Ok(exit) => exit,
            Err(source) => {
                shared.finish(Err(RunError::Backend { vcpu: id, source }));
                break;
            }
        };
        let mut ctx = ExitContext {
            vcpu_id: id,
            vcpu: &mut *vcpu,
            shared,
            stats: &mut stats,
            line: &mut line,
        };
        match handle_exit(&mut ctx, &exit) {
            Ok(Flow::Continue) => {}
            Ok(Flow::Halt) => {
                shared.console_write(&std::mem::take(&mut line));
                if let Some(debug) = &shared.debug {
                    debug.halting(id, &mut *vcpu);
                }
                shared.publish(id, &stats);
                if !shared.halt(id) {
                    break;
                }
            }
            Ok(Flow::Exit(status)) => {
                shared.finish(Ok(RunStatus::Exited(status)));
                break;
            }
            Ok(Flow::Stop) => break,
            Err(e) => {
                shared.finish(Err(e));
                break;
            }
        }
    }
    shared.console_write(&line);
    shared.publish(id, &stats);
    if let Some(debug) = &shared.debug {
        debug.gone(id);
    }
    stats
}
