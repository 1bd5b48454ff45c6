//! The vCPU side of a run: the loop each vCPU thread runs, the exit-handler table it dispatches
//! through, the state vCPUs share (halt and kick, stop, how the run ended) and the outcomes.

mod exits;
mod shared;
mod threads;

use std::time::Duration;

pub(crate) use shared::Shared;
pub(crate) use threads::Threads;

use crate::backend::{BackendError, GuestFault, Vcpu, VcpuExit};
use crate::stats::VcpuStats;
use crate::x86::descriptors::exception_name;
use exits::{handle_exit, ExitContext, Flow, Inline};

/// Why a run ended with an error. [`RunError::blame`] sorts each one into the guest's fault,
/// the host's, or the time limit; messages are short and leave the detail to their source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The guest triple-faulted (guest fault).
    #[error("guest triple fault on vCPU {vcpu} at RIP {rip:#x}")]
    TripleFault {
        /// The vCPU.
        vcpu: u32,
        /// Where (as the backend reports it).
        rip: u64,
    },
    /// An exception the guest did not handle (guest fault).
    #[error("unhandled guest exception on vCPU {vcpu}: {}", describe_fault(fault))]
    GuestFault {
        /// The vCPU.
        vcpu: u32,
        /// The exception.
        fault: GuestFault,
    },
    /// The guest read or wrote guest-physical memory with nothing behind it (guest fault).
    #[error(
        "vCPU {vcpu}: {} of {len} bytes at guest-physical {gpa:#x}, which has no RAM or device \
         behind it",
        if *write { "write" } else { "read" }
    )]
    UnbackedAccess {
        /// The vCPU.
        vcpu: u32,
        /// The guest-physical address.
        gpa: u64,
        /// A write (else a read).
        write: bool,
        /// The access size in bytes.
        len: u8,
    },
    /// A 1- or 2-byte write to the exit port (guest fault; see [`crate::devices::PortWrite`]).
    #[error(
        "vCPU {vcpu}: {size}-byte write of {data:#x} to the exit port: only a 4-byte write \
         (`out 0xf8, eax`, the SDKs' exit) ends a run, so the guest has gone wrong"
    )]
    StrayExit {
        /// The vCPU.
        vcpu: u32,
        /// The write's size in bytes.
        size: u8,
        /// What it wrote.
        data: u32,
    },
    /// The timeout set with [`crate::vm::VmBuilder::timeout`] fired (neither side's fault).
    #[error("guest did not finish within {0:?} (--timeout)")]
    Timeout(Duration),
    /// The backend stopped a vCPU for a reason vmcall has no handler for (host fault: the
    /// backend could not translate what the guest did).
    #[error("vCPU {vcpu}: exit vmcall does not handle: {exit}")]
    UnhandledExit {
        /// The vCPU.
        vcpu: u32,
        /// The exit, as the backend reported it.
        exit: VcpuExit,
    },
    /// A vCPU thread panicked, in a backend or in vmcall (host fault).
    #[error("vCPU {vcpu}: its thread panicked: {message}")]
    VcpuPanicked {
        /// The vCPU whose thread panicked.
        vcpu: u32,
        /// The panic's message.
        message: String,
    },
    /// A vCPU thread could not be started (host fault).
    #[error("cannot start the thread of vCPU {vcpu}")]
    Thread {
        /// The vCPU.
        vcpu: u32,
        /// Why.
        source: std::io::Error,
    },
    /// A thread could not be confined by its seccomp filter (host fault).
    #[error("cannot confine {thread} with its seccomp filter (--no-seccomp runs without)")]
    Seccomp {
        /// Which thread (`vCPU 0`, `the thread running the VM`).
        thread: String,
        /// Why.
        source: crate::seccomp::SeccompError,
    },
    /// The backend failed (host fault).
    #[error("vCPU {vcpu}: backend failure")]
    Backend {
        /// The vCPU.
        vcpu: u32,
        /// What failed.
        source: BackendError,
    },
}

/// Whose fault a failed run is ([`RunError::blame`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The guest did something it must not (an exception it did not handle, a triple fault,
    /// an access to nothing, a stray exit-port write): vmcall and the host worked as
    /// specified, and the report is about the guest.
    Guest,
    /// vmcall, its backend or the host failed (or could not tell what the guest did).
    Host,
    /// The run's time limit ran out.
    Timeout,
}

impl RunError {
    /// Whose fault this is. Every variant is classified here, without a wildcard, so a new
    /// one must be too.
    pub fn blame(&self) -> Blame {
        match self {
            RunError::TripleFault { .. }
            | RunError::GuestFault { .. }
            | RunError::UnbackedAccess { .. }
            | RunError::StrayExit { .. } => Blame::Guest,
            RunError::Timeout(_) => Blame::Timeout,
            RunError::UnhandledExit { .. }
            | RunError::VcpuPanicked { .. }
            | RunError::Thread { .. }
            | RunError::Seccomp { .. }
            | RunError::Backend { .. } => Blame::Host,
        }
    }

    /// Whether the guest is to blame ([`Blame::Guest`]).
    pub fn is_guest_fault(&self) -> bool {
        self.blame() == Blame::Guest
    }

    /// The vCPU the error happened on, if it concerns one.
    pub fn vcpu(&self) -> Option<u32> {
        match self {
            RunError::TripleFault { vcpu, .. }
            | RunError::GuestFault { vcpu, .. }
            | RunError::UnbackedAccess { vcpu, .. }
            | RunError::StrayExit { vcpu, .. }
            | RunError::UnhandledExit { vcpu, .. }
            | RunError::VcpuPanicked { vcpu, .. }
            | RunError::Thread { vcpu, .. }
            | RunError::Backend { vcpu, .. } => Some(*vcpu),
            RunError::Timeout(_) | RunError::Seccomp { .. } => None,
        }
    }
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
    let mut recent = crate::trace::RecentCalls::default();
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
        let mut inline =
            Inline { vcpu_id: id, shared, stats: &mut stats, recent: &mut recent, line: &mut line };
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
            recent: &mut recent,
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
                shared.note_last_calls(id, &recent);
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

#[cfg(test)]
mod tests;
