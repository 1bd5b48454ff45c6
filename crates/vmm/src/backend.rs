//! The seam between the VMM and a hypervisor or emulator: a thin trait that creates vCPUs, runs
//! one of them until the next exit and translates that exit into the neutral [`VcpuExit`].
//! Dispatch, hypercall emulation, statistics and the table live once, above this trait.

use std::sync::Arc;

use vmcall_abi::ExitReason;

use crate::boot::elf::{CodeRoot, Segment};
use crate::boot::VcpuInit;
use crate::hypercall::{ForeignInsn, HypercallExit};
use crate::memory::GuestRam;
use crate::seccomp::{Allowed, ThreadKind};
use crate::x86::cpuid::PvCpuid;
use crate::x86::{Regs, SpecialRegs};

/// An error inside a backend. Always a host fault: a backend reports what the guest did as a
/// [`VcpuExit`], never as an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// A call into the hypervisor failed; `op` names it (`KVM_RUN`, `KVM_SET_REGS`, ...).
    #[error("{op} failed")]
    Hypervisor {
        /// The ioctl or system call.
        op: &'static str,
        /// What the kernel answered.
        #[source]
        source: std::io::Error,
    },
    /// A call into the software CPU failed; `op` says what it was doing.
    #[error("emulator call failed ({op})")]
    Emulator {
        /// The operation or register (`run`, `map guest RAM`, `RIP`, ...).
        op: &'static str,
        /// The emulator's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The host's hypervisor or emulator lacks something this VM needs.
    #[error("{0}")]
    Unsupported(String),
    /// Setting up the VM or a vCPU failed for a reason other than a failed call; `what` says
    /// which step.
    #[error("{what}")]
    Setup {
        /// The step (`rewriting hypercall sites`, ...).
        what: &'static str,
        /// Why it failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The VMM asked to complete an exit that is not pending (a VMM bug): `what` says which.
    #[error("no {0} is pending")]
    NotPending(&'static str),
    /// The hypervisor stopped the vCPU in a way the backend does not expect here.
    #[error("unexpected exit: {0}")]
    UnexpectedExit(String),
}

impl BackendError {
    /// A failed hypervisor call `op`, from the errno it returned.
    pub fn hypervisor(op: &'static str, errno: i32) -> Self {
        Self::Hypervisor { op, source: std::io::Error::from_raw_os_error(errno) }
    }

    /// A failed emulator call `op`.
    pub fn emulator(
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Emulator { op, source: Box::new(source) }
    }

    /// A failed setup step `what`.
    pub fn setup(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Setup { what, source: Box::new(source) }
    }
}

/// An exception the guest did not handle, reported by the VMM-owned IDT stubs or the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// The exception vector (0..=31).
    pub vector: u8,
    /// The error code the CPU pushed, for vectors that have one.
    pub error_code: Option<u64>,
    /// RIP of the faulting instruction.
    pub rip: u64,
    /// CS of the faulting code (its low two bits are the CPL).
    pub cs: u16,
    /// Faulting address of a page fault.
    pub cr2: Option<u64>,
}

/// Why a vCPU stopped running, in backend-neutral terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// `out` to `port` of `size` bytes (1, 2 or 4), value in the low bytes of `data`.
    IoOut {
        /// The port.
        port: u16,
        /// Bytes written: 1, 2 or 4.
        size: u8,
        /// The value, in the low `size` bytes.
        data: u32,
    },
    /// `in` from `port`; answer with [`Vcpu::complete_io_in`].
    IoIn {
        /// The port.
        port: u16,
        /// Bytes read: 1, 2 or 4.
        size: u8,
    },
    /// HLT (with no interrupt controller, always a stop of this vCPU).
    Hlt,
    /// A VMCALL or VMMCALL; answer with [`Vcpu::complete_hypercall`].
    Hypercall(HypercallExit),
    /// An exception the guest does not handle.
    Fault(GuestFault),
    /// Triple fault.
    Shutdown {
        /// RIP at the shutdown.
        rip: u64,
    },
    /// A debug exit the backend did not consume.
    Debug {
        /// RIP at the debug exit.
        rip: u64,
    },
    /// An access to a guest-physical address with no RAM behind it (`data`: what a write
    /// writes); answer a read with [`Vcpu::complete_mmio_read`].
    Mmio {
        /// The guest-physical address.
        gpa: u64,
        /// A write (else a read).
        write: bool,
        /// Bytes accessed.
        len: u8,
        /// The value a write writes.
        data: u64,
    },
    /// A stop a debugger asked for through [`Vcpu::set_guest_debug`]: a breakpoint, the end
    /// of a single step, a watchpoint. RIP is where the vCPU stopped (before the instruction
    /// at a breakpoint, after the instruction for a step or a watchpoint).
    Debugger(DebugStop),
    /// Stopped from another thread through [`Interrupter::interrupt`] (or a signal): the
    /// host's doing, not the guest's. The vCPU loop stops if the run is ending, else resumes.
    Interrupted,
    /// Anything else; the text says what.
    Unknown(String),
}

impl VcpuExit {
    /// The index into the exit-handler table.
    pub fn reason(&self) -> ExitReason {
        match self {
            VcpuExit::IoOut { .. } | VcpuExit::IoIn { .. } => ExitReason::Io,
            VcpuExit::Hlt => ExitReason::Hlt,
            VcpuExit::Hypercall(_) => ExitReason::Hypercall,
            VcpuExit::Fault(_) => ExitReason::Fault,
            VcpuExit::Shutdown { .. } => ExitReason::Shutdown,
            VcpuExit::Debug { .. } | VcpuExit::Debugger(_) => ExitReason::Debug,
            VcpuExit::Mmio { .. } => ExitReason::Mmio,
            VcpuExit::Interrupted => ExitReason::Interrupted,
            VcpuExit::Unknown(_) => ExitReason::Unknown,
        }
    }
}

impl std::fmt::Display for VcpuExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuExit::IoOut { port, size, data } => {
                write!(f, "{size}-byte write of {data:#x} to port {port:#x}")
            }
            VcpuExit::IoIn { port, size } => write!(f, "{size}-byte read from port {port:#x}"),
            VcpuExit::Hlt => f.write_str("HLT"),
            VcpuExit::Hypercall(hc) => write!(f, "hypercall {} at RIP {:#x}", hc.nr, hc.rip),
            VcpuExit::Fault(fault) => {
                write!(f, "exception {} at RIP {:#x}", fault.vector, fault.rip)
            }
            VcpuExit::Shutdown { rip } => write!(f, "triple fault at RIP {rip:#x}"),
            VcpuExit::Debug { rip } => write!(f, "debug exit at RIP {rip:#x}"),
            VcpuExit::Mmio { gpa, write: true, len, data } => {
                write!(f, "{len}-byte write of {data:#x} to guest-physical {gpa:#x}")
            }
            VcpuExit::Mmio { gpa, write: false, len, .. } => {
                write!(f, "{len}-byte read from guest-physical {gpa:#x}")
            }
            VcpuExit::Debugger(stop) => write!(f, "debugger stop ({stop:?})"),
            VcpuExit::Interrupted => f.write_str("interrupted"),
            VcpuExit::Unknown(what) => f.write_str(what),
        }
    }
}

/// Why a vCPU stopped for a debugger ([`VcpuExit::Debugger`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugStop {
    /// Before the instruction at this linear address, one of [`GuestDebug::breakpoints`].
    Breakpoint(u64),
    /// One instruction ran under [`GuestDebug::single_step`].
    Step,
    /// The instruction just executed accessed the watched range starting at `addr`.
    Watch {
        /// The start of the watched range.
        addr: u64,
        /// What the watchpoint watches.
        kind: WatchKind,
    },
    /// An INT3 in guest code ran, under [`GuestDebug::int3`]; RIP is past it, as the CPU
    /// leaves it (a debugger that wrote it there moves RIP back itself).
    Int3,
}

/// What a watchpoint watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WatchKind {
    /// Writes.
    Write,
    /// Reads.
    Read,
    /// Reads and writes.
    Access,
}

/// A watched range of linear addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Watchpoint {
    /// The first linear address watched.
    pub addr: u64,
    /// How many bytes are watched.
    pub len: u64,
    /// What the watchpoint watches.
    pub kind: WatchKind,
}

/// What a debugger wants a vCPU to stop at from its next [`Vcpu::run`] on (empty: nothing,
/// the vCPU runs as without a debugger).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Stop before executing the instruction at any of these linear addresses.
    pub breakpoints: Vec<u64>,
    /// Stop after an instruction that accesses one of these ranges.
    pub watchpoints: Vec<Watchpoint>,
    /// Run one instruction, then stop with [`DebugStop::Step`] (a hypercall counts as one
    /// instruction: it is answered, and the step ends after it).
    pub single_step: bool,
    /// Stop at every INT3 the guest executes ([`DebugStop::Int3`]) instead of delivering its
    /// #BP: a debugger's software breakpoints written into guest memory
    /// ([`DebugCaps::int3`]).
    pub int3: bool,
}

impl GuestDebug {
    /// Whether this asks for nothing.
    pub fn is_empty(&self) -> bool {
        self.breakpoints.is_empty()
            && self.watchpoints.is_empty()
            && !self.single_step
            && !self.int3
    }
}

/// What a backend's debugging support can do, for a debugger to decide how to serve requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DebugCaps {
    /// Whether [`Vcpu::set_guest_debug`] works at all.
    pub supported: bool,
    /// How many breakpoints plus watchpoints can be armed at once (`None`: no limit).
    pub max_slots: Option<usize>,
    /// Whether watchpoints work.
    pub watchpoints: bool,
    /// Whether [`GuestDebug::int3`] works: a debugger then writes INT3 for its software
    /// breakpoints, with no limit, instead of arming [`GuestDebug::breakpoints`].
    pub int3: bool,
}

/// Stops a running vCPU from another thread; its `run` then returns [`VcpuExit::Interrupted`]
/// (soon, not necessarily at once: callers repeat it until the vCPU thread has stopped).
pub trait Interrupter: Send + Sync {
    /// Ask the vCPU to leave `run` with [`VcpuExit::Interrupted`]; callable from any thread.
    fn interrupt(&self);
}

/// Handles exits without leaving the backend's run loop, for a backend that can do so from
/// inside it (the emulator's hooks). The VMM hands one to every [`Vcpu::run`]; it is backed by
/// the very code that handles the corresponding [`VcpuExit`]s, so both paths give the same
/// answers, statistics, traces and console output.
pub trait InlineExits {
    /// Answer a hypercall and return the value for RAX; the backend then writes RAX and moves
    /// RIP past the instruction itself. `guest_tsc` reads the calling vCPU's TSC, if needed.
    fn hypercall(&mut self, call: &HypercallExit, guest_tsc: &mut dyn FnMut() -> u64) -> u64;
    /// Perform a port write. Returns true if the write needs the vCPU loop (it ends the run):
    /// the backend must then stop and report it as a [`VcpuExit::IoOut`] instead.
    fn port_out(&mut self, port: u16, size: u8, data: u32) -> bool;
    /// Perform a port read of `size` bytes.
    fn port_in(&mut self, port: u16, size: u8) -> u32;
    /// Perform an MMIO read of `len` bytes; `None` when no device answers there (the backend
    /// must then stop and report a [`VcpuExit::Mmio`]).
    fn mmio_read(&mut self, gpa: u64, len: u8) -> Option<u64>;
    /// Perform an MMIO write; false when no device is there (as for `mmio_read`).
    fn mmio_write(&mut self, gpa: u64, len: u8, data: u64) -> bool;
    /// Whether `call` must not be answered inline but reported as a [`VcpuExit::Hypercall`]
    /// (a debugger stops before it is answered). The backend then stops with that exit.
    fn hypercall_needs_loop(&mut self, call: &HypercallExit) -> bool {
        let _ = call;
        false
    }
}

/// One virtual CPU. The VMM moves it to its own thread before calling any method.
pub trait Vcpu: Send {
    /// Run until the next exit. A backend may handle hypercalls and port writes through
    /// `inline` on the way instead of returning them as exits.
    fn run(&mut self, inline: &mut dyn InlineExits) -> Result<VcpuExit, BackendError>;
    /// Finish the hypercall of the last exit: RAX = `rax`, RIP past the instruction.
    fn complete_hypercall(&mut self, rax: u64) -> Result<(), BackendError>;
    /// Finish the `in` of the last exit with `data`.
    fn complete_io_in(&mut self, data: u32) -> Result<(), BackendError>;
    /// Finish the MMIO read of the last exit with `data` (its low `len` bytes).
    fn complete_mmio_read(&mut self, data: u64) -> Result<(), BackendError>;
    /// Current general-purpose registers (diagnostics, tests).
    fn regs(&mut self) -> Result<Regs, BackendError>;
    /// The guest's TSC now.
    fn guest_tsc(&mut self) -> u64;
    /// An interrupter for this vCPU; call it on the thread that will call `run`.
    fn interrupter(&self) -> Arc<dyn Interrupter>;
    /// Put the vCPU back at the hypercall instruction of the last exit, as if it had not run
    /// yet (a debugger stops there before the call is answered); [`Vcpu::complete_hypercall`]
    /// still finishes it. A backend whose hypercall exits already stand there keeps the default.
    fn rewind_hypercall(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Set the general-purpose registers (a debugger's register writes).
    fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError> {
        let _ = regs;
        Err(BackendError::Unsupported("this backend cannot write registers".into()))
    }
    /// Segment, control and descriptor-table registers (a debugger reads them, and the
    /// paging registers to read memory at the guest's virtual addresses).
    fn sregs(&mut self) -> Result<SpecialRegs, BackendError> {
        Err(BackendError::Unsupported("this backend cannot read special registers".into()))
    }
    /// What [`Vcpu::set_guest_debug`] can do here.
    fn debug_caps(&self) -> DebugCaps {
        DebugCaps::default()
    }
    /// Stop at `debug`'s breakpoints and watchpoints (and after one instruction if it single
    /// steps) from the next `run` on, with [`VcpuExit::Debugger`]; an empty `debug` turns it
    /// all off. Replaces what the previous call asked for.
    fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<(), BackendError> {
        if debug.is_empty() {
            return Ok(());
        }
        Err(BackendError::Unsupported("this backend has no debugging support".into()))
    }
}

/// What a backend learns about the guest when the VM is created.
#[derive(Debug, Clone, Default)]
pub struct GuestInfo {
    /// How many vCPUs the VM has.
    pub vcpus: u32,
    /// The guest's entry point.
    pub entry: u64,
    /// The loaded ELF segments; a backend may scan the executable ones for hypercall sites.
    pub segments: Vec<Segment>,
    /// Where code is known to start (entry point, function symbols), and its width.
    pub code_roots: Vec<CodeRoot>,
    /// The KVM CPUID leaves' PV features, and whether they are enforced.
    pub pv: PvCpuid,
    /// What the other vendor's hypercall instruction does.
    pub foreign: ForeignInsn,
}

/// A created VM on some backend.
pub trait VmBackend: Send + Sync {
    /// Create vCPU `id` in the state `init`.
    fn create_vcpu(&self, id: u32, init: &VcpuInit) -> Result<Box<dyn Vcpu>, BackendError>;
    /// One line saying how hypercalls are trapped (for `--stats` and logs).
    fn describe(&self) -> String;
    /// The syscalls this backend's threads of `kind` make beyond vmcall's common lists
    /// ([`crate::seccomp`]): for a vCPU thread, the hypervisor's run and register calls.
    fn syscalls(&self, kind: ThreadKind) -> Vec<Allowed> {
        let _ = kind;
        Vec::new()
    }
}

/// A way to run VMs: KVM, an emulator, or a test double.
pub trait Hypervisor: Send + Sync {
    /// The backend's short name (`kvm`, `emu`), for messages and `--backend`.
    fn name(&self) -> &'static str;
    /// Create a VM whose RAM is `ram`, already loaded and set up for boot.
    fn create_vm(
        &self,
        ram: Arc<GuestRam>,
        guest: &GuestInfo,
    ) -> Result<Box<dyn VmBackend>, BackendError>;
}
