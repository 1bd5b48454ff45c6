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
    /// A vCPU triple-faulted.
    #[error("guest triple fault on vCPU {vcpu} at RIP {rip:#x}")]
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// RIP at the triple fault.
        rip: u64,
    },
    /// A guest exception nobody handles.
    #[error("unhandled guest exception on vCPU {vcpu}: {}", describe_fault(fault))]
    GuestFault {
        /// The vCPU.
        vcpu: u32,
        /// The exception.
        fault: GuestFault,
    },
    /// The run did not end within the timeout (its length).
    #[error("guest did not finish within {0:?} (--timeout)")]
    Timeout(Duration),
    /// An exit vmcall cannot handle.
    #[error("vCPU {vcpu}: unhandled exit: {what}")]
    Unhandled {
        /// The vCPU.
        vcpu: u32,
        /// What the exit was.
        what: String,
    },
    /// A 1- or 2-byte write to the exit port.
    #[error(
        "vCPU {vcpu}: {size}-byte write of {data:#x} to the exit port: only a 4-byte write \
         (`out 0xf8, eax`, the SDKs' exit) ends a run, so the guest has gone wrong"
    )]
    StrayExit {
        /// The vCPU.
        vcpu: u32,
        /// Bytes written.
        size: u8,
        /// The value written.
        data: u32,
    },
    /// A vCPU thread panicked.
    #[error("vCPU {vcpu}: its thread panicked: {message}")]
    VcpuPanicked {
        /// The vCPU.
        vcpu: u32,
        /// The panic's message.
        message: String,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {vcpu}")]
    Thread {
        /// The vCPU.
        vcpu: u32,
        /// The cause.
        source: std::io::Error,
    },
    /// A thread could not be confined.
    #[error("cannot confine {thread} with its seccomp filter (--no-seccomp runs without)")]
    Seccomp {
        /// Which thread.
        thread: String,
        /// The cause.
        source: crate::seccomp::SeccompError,
    },
    /// The backend failed.
    #[error("vCPU {vcpu}: backend failure")]
    Backend {
        /// The vCPU.
        vcpu: u32,
        /// The cause.
        source: BackendError,
    },
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
    while !shared.stopping() {
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
    stats
}
