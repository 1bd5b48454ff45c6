//! A scripted backend, for testing the run loop without a hypervisor: each vCPU plays a list of
//! [`Step`]s (exits to return, errors, a panic, waiting to be interrupted) and records what the
//! VMM answered it ([`Completion`]). Everything above the backend seam — dispatch through the
//! exit table and the hypercall table, HLT and kicks, stop, timeouts, panics — runs for real.
//!
//! Built for this crate's unit tests, and for other crates with the `test-double` feature.
//! One [`Scripted`] serves one VM: building the VM takes its scripts.
//!
//! `crates/vmm/src/vcpu/tests.rs` shows it in use: a script per vCPU, `VmBuilder::new(image())
//! ...build(&scripted)`, `run()`, then the report and [`Scripted::completions`].

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::Duration;

use vmcall_abi::ports;

use crate::backend::{
    BackendError, GuestInfo, Hypervisor, InlineExits, Interrupter, Vcpu, VcpuExit, VmBackend,
};
use crate::boot::elf::minimal_elf;
use crate::boot::VcpuInit;
use crate::hypercall::{HypercallExit, HypercallInsn};
use crate::memory::GuestRam;
use crate::x86::{CpuMode, PagingContext, Regs};

/// One step of a scripted vCPU; each call of [`Vcpu::run`] plays steps until one returns.
#[derive(Debug)]
pub enum Step {
    /// Return this exit.
    Exit(VcpuExit),
    /// Return this error.
    Fail(BackendError),
    /// Panic with this message, as a backend that gives up would.
    Panic(&'static str),
    /// Sleep this long, then play the next step (to order vCPUs loosely).
    Sleep(Duration),
    /// Wait at this barrier, then play the next step (to order vCPUs and the test strictly:
    /// a vCPU past it is inside `run`).
    Wait(Arc<Barrier>),
    /// Behave like a guest that never exits: wait until interrupted, then return
    /// [`VcpuExit::Interrupted`]. Never used up: every later `run` waits again.
    Spin,
}

/// What the VMM told a scripted vCPU after an exit, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// [`Vcpu::complete_hypercall`] with this RAX.
    Hypercall(u64),
    /// [`Vcpu::complete_io_in`] with this value.
    IoIn(u32),
    /// [`Vcpu::complete_mmio_read`] with this value.
    MmioRead(u64),
}

/// A [`Hypervisor`] whose vCPUs play scripts: vCPU `i` plays `scripts[i]` (none: it halts).
/// When its script is used up a vCPU halts, again at every later `run`.
#[derive(Debug)]
pub struct Scripted {
    scripts: Mutex<Vec<Vec<Step>>>,
    record: Arc<Record>,
}

/// What every vCPU was told, and how often it was interrupted.
#[derive(Debug, Default)]
struct Record {
    completions: Mutex<Vec<Vec<Completion>>>,
    interrupts: Mutex<Vec<u64>>,
}

impl Scripted {
    /// A hypervisor for one VM whose vCPU `i` plays `scripts[i]`.
    pub fn new(scripts: Vec<Vec<Step>>) -> Self {
        Self { scripts: Mutex::new(scripts), record: Arc::default() }
    }

    /// What the VMM told vCPU `vcpu`, in order.
    pub fn completions(&self, vcpu: u32) -> Vec<Completion> {
        lock(&self.record.completions).get(vcpu as usize).cloned().unwrap_or_default()
    }

    /// How many times vCPU `vcpu` was interrupted.
    pub fn interrupts(&self, vcpu: u32) -> u64 {
        lock(&self.record.interrupts).get(vcpu as usize).copied().unwrap_or(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hypervisor for Scripted {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn create_vm(
        &self,
        _: Arc<GuestRam>,
        guest: &GuestInfo,
    ) -> Result<Box<dyn VmBackend>, BackendError> {
        let mut scripts: VecDeque<_> = std::mem::take(&mut *lock(&self.scripts)).into();
        let n = guest.vcpus as usize;
        *lock(&self.record.completions) = vec![Vec::new(); n];
        *lock(&self.record.interrupts) = vec![0; n];
        let scripts = (0..n).map(|_| scripts.pop_front().unwrap_or_default().into()).collect();
        Ok(Box::new(ScriptedVm { scripts: Mutex::new(scripts), record: self.record.clone() }))
    }
}

struct ScriptedVm {
    scripts: Mutex<Vec<VecDeque<Step>>>,
    record: Arc<Record>,
}

impl VmBackend for ScriptedVm {
    fn create_vcpu(&self, id: u32, _: &VcpuInit) -> Result<Box<dyn Vcpu>, BackendError> {
        let script = lock(&self.scripts).get_mut(id as usize).map(std::mem::take);
        Ok(Box::new(ScriptedVcpu {
            id,
            script: script.unwrap_or_default(),
            signal: Arc::new(Signal { id, pending: Mutex::new(false), cv: Condvar::new() }),
            record: self.record.clone(),
            tsc: AtomicU64::new(0),
        }))
    }

    fn describe(&self) -> String {
        "scripted test double".into()
    }
}

/// A pending interrupt, and the condition variable a spinning vCPU waits on.
struct Signal {
    id: u32,
    pending: Mutex<bool>,
    cv: Condvar,
}

struct SignalInterrupter {
    signal: Arc<Signal>,
    record: Arc<Record>,
}

impl Interrupter for SignalInterrupter {
    fn interrupt(&self) {
        if let Some(n) = lock(&self.record.interrupts).get_mut(self.signal.id as usize) {
            *n += 1;
        }
        *lock(&self.signal.pending) = true;
        self.signal.cv.notify_all();
    }
}

struct ScriptedVcpu {
    id: u32,
    script: VecDeque<Step>,
    signal: Arc<Signal>,
    record: Arc<Record>,
    tsc: AtomicU64,
}

impl ScriptedVcpu {
    fn complete(&self, c: Completion) {
        if let Some(log) = lock(&self.record.completions).get_mut(self.id as usize) {
            log.push(c);
        }
    }
}

impl Vcpu for ScriptedVcpu {
    fn run(&mut self, _: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
        loop {
            match self.script.pop_front() {
                None => return Ok(VcpuExit::Hlt),
                Some(Step::Exit(exit)) => return Ok(exit),
                Some(Step::Fail(e)) => return Err(e),
                Some(Step::Panic(message)) => panic!("{message}"),
                Some(Step::Sleep(d)) => std::thread::sleep(d),
                Some(Step::Wait(barrier)) => {
                    barrier.wait();
                }
                Some(Step::Spin) => {
                    self.script.push_front(Step::Spin);
                    let mut pending = lock(&self.signal.pending);
                    while !*pending {
                        pending = self.signal.cv.wait(pending).unwrap_or_else(|p| p.into_inner());
                    }
                    *pending = false;
                    return Ok(VcpuExit::Interrupted);
                }
            }
        }
    }

    fn complete_hypercall(&mut self, rax: u64) -> Result<(), BackendError> {
        self.complete(Completion::Hypercall(rax));
        Ok(())
    }

    fn complete_io_in(&mut self, data: u32) -> Result<(), BackendError> {
        self.complete(Completion::IoIn(data));
        Ok(())
    }

    fn complete_mmio_read(&mut self, data: u64) -> Result<(), BackendError> {
        self.complete(Completion::MmioRead(data));
        Ok(())
    }

    fn regs(&mut self) -> Result<Regs, BackendError> {
        Ok(Regs::default())
    }

    fn guest_tsc(&mut self) -> u64 {
        self.tsc.fetch_add(1000, Ordering::Relaxed)
    }

    fn interrupter(&self) -> Arc<dyn Interrupter> {
        Arc::new(SignalInterrupter { signal: self.signal.clone(), record: self.record.clone() })
    }
}

/// A guest image for [`crate::vm::VmBuilder::new`] (a lone HLT): a scripted vCPU never runs
/// it, but the builder loads it as it would any guest.
pub fn image() -> Vec<u8> {
    minimal_elf(0x20_0000, &[0xf4])
}

/// A VMCALL of `nr` with `args` from CPL 0 in 64-bit mode.
pub fn hypercall(nr: u64, args: [u64; 4]) -> VcpuExit {
    hypercall_at_cpl(nr, args, 0)
}

/// A VMCALL of `nr` with `args` from `cpl` in 64-bit mode.
pub fn hypercall_at_cpl(nr: u64, args: [u64; 4], cpl: u8) -> VcpuExit {
    VcpuExit::Hypercall(HypercallExit {
        nr,
        args,
        cpl,
        mode: CpuMode::Long64,
        rip: 0x20_0000,
        insn: HypercallInsn::native(),
        paging: PagingContext::default(),
    })
}

/// The guest's `exit(status)`: a 4-byte write to the exit port.
pub fn exit_with(status: u32) -> VcpuExit {
    VcpuExit::IoOut { port: ports::PORT_EXIT, size: 4, data: status }
}

/// A console (or any writer) that keeps what is written to it, for a test to read afterwards;
/// clones share the bytes, so a test keeps one and gives the VM another.
#[derive(Debug, Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    /// Everything written so far.
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Everything written so far, as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
