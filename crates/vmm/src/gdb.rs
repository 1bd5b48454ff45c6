//! A gdb remote stub (`vmcall run --gdb PORT`, `docs/gdb.md`), built on the `gdbstub` crate
//! over the backend-neutral [`DebugHub`]: one gdb thread per vCPU, registers, memory at the
//! guest's virtual addresses (walked through the stopped vCPU's own page tables),
//! breakpoints, watchpoints where the backend has them, single steps, Ctrl-C, `catch syscall
//! NR` for hypercall NR, monitor commands, and a detach that lets the guest run on.

use std::collections::BTreeSet;
use std::net::{TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::{Connection, ConnectionExt};
use gdbstub::outputln;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::ext::catch_syscalls::{
    CatchSyscallPosition, CatchSyscalls, CatchSyscallsOps, SyscallNumbers,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::ext::thread_extra_info::{ThreadExtraInfo, ThreadExtraInfoOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;

use crate::backend::{WatchKind, Watchpoint};
use crate::debug::{Action, DebugHub, Reply, Request, StopReason, Waited};
use crate::memory::GuestRam;
use crate::x86::{PagingContext, Regs, SpecialRegs, VirtualMemory};

/// How often the stub looks at the connection (for gdb's Ctrl-C) while the guest runs.
const POLL: Duration = Duration::from_millis(20);

/// What ended a gdb session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    /// gdb detached, or the connection closed: the guest runs on.
    Detached,
    /// gdb killed the guest: the run should stop.
    Killed,
    /// The guest's run ended while gdb was attached.
    VmEnded,
}

/// Serve one gdb connection until it ends. Every vCPU is paused (before its first
/// instruction, for a new VM) until gdb resumes it.
pub fn serve(stream: TcpStream, hub: Arc<DebugHub>, ram: Arc<GuestRam>) -> SessionEnd {
    let end = serve_inner(stream, hub.clone(), ram, BTreeSet::new());
    hub.detach();
    end
}

/// The target gdb sees: the whole VM, one thread per vCPU (thread id = vCPU id + 1).
struct GdbTarget {
    hub: Arc<DebugHub>,
    ram: Arc<GuestRam>,
    /// Breakpoints gdb set as software and as hardware ones (served alike by the backend).
    sw: BTreeSet<u64>,
    hw: BTreeSet<u64>,
    /// Each vCPU's action for the next resume, as gdb gave it.
    actions: Vec<Option<Action>>,
    /// gdb's scheduler locking for the next resume: vCPUs without an action stay parked.
    locked: bool,
    /// Every vCPU's backend traps INT3: gdb's software breakpoints are memory breakpoints.
    int3: bool,
    /// gdb's `catch syscall` filter (`Some(None)`: every number).
    gdb_catch: Option<Option<BTreeSet<u64>>>,
    /// Hypercalls caught by the monitor command (or `--gdb-break-on-hypercall`).
    user_catch: BTreeSet<u64>,
    user_catch_all: bool,
}

fn tid(vcpu: u32) -> Tid {
    NonZeroUsize::new(vcpu as usize + 1).expect("non-zero")
}

fn vcpu_of(tid: Tid) -> u32 {
    (tid.get() - 1) as u32
}

/// A non-fatal error for gdb (it shows "E01"-style failures, the session goes on).
fn nonfatal<T>(msg: impl std::fmt::Display) -> TargetResult<T, GdbTarget> {
    tracing::debug!("gdb request failed: {msg}");
    Err(TargetError::NonFatal)
}

impl GdbTarget {
    /// What gdb's thread `tid` is to do at the next resume (an unknown thread: nothing).
    fn set_action(&mut self, tid: Tid, action: Action) {
        if let Some(a) = self.actions.get_mut(vcpu_of(tid) as usize) {
            *a = Some(action);
        }
    }

    fn regs(&self, vcpu: u32) -> Result<Regs, String> {
        match self.hub.request(vcpu, Request::Regs)? {
            Reply::Regs(r) => Ok(r),
            _ => Err("unexpected reply".into()),
        }
    }

    fn sregs(&self, vcpu: u32) -> Result<SpecialRegs, String> {
        match self.hub.request(vcpu, Request::Sregs)? {
            Reply::Sregs(s) => Ok(s),
            _ => Err("unexpected reply".into()),
        }
    }

    fn memory(&self, vcpu: u32) -> Result<VirtualMemory<'_>, String> {
        let sregs = self.sregs(vcpu)?;
        Ok(VirtualMemory::new(&self.ram, PagingContext::from_sregs(&sregs)))
    }

    /// Push the catches of gdb and of the user to the hub.
    fn update_catches(&mut self) {
        let mut numbers = self.user_catch.clone();
        let mut all = self.user_catch_all;
        match &self.gdb_catch {
            Some(None) => all = true,
            Some(Some(set)) => numbers.extend(set),
            None => {}
        }
        self.hub.configure(|c| {
            c.catch_hypercalls = numbers;
            c.catch_all_hypercalls = all;
        });
    }

    fn gdb_catches(&self, nr: u64) -> bool {
        match &self.gdb_catch {
            Some(None) => true,
            Some(Some(set)) => set.contains(&nr),
            None => false,
        }
    }

    /// Whether one more breakpoint or watchpoint fits the backend's slots (and the backend
    /// has any).
    fn room(&self) -> bool {
        if (0..self.hub.vcpus()).filter_map(|v| self.hub.caps(v)).any(|c| !c.supported) {
            return false;
        }
        let used = self.hub.config().breakpoints.len() + self.hub.config().watchpoints.len();
        let max = (0..self.hub.vcpus()).filter_map(|v| self.hub.caps(v)?.max_slots).min();
        max.is_none_or(|m| used < m)
    }

    fn stop_reason(&self, vcpu: u32, reason: StopReason) -> MultiThreadStopReason<u64> {
        let tid = tid(vcpu);
        match reason {
            StopReason::Breakpoint(addr) if self.hw.contains(&addr) && !self.sw.contains(&addr) => {
                MultiThreadStopReason::HwBreak(tid)
            }
            StopReason::Breakpoint(_) => MultiThreadStopReason::SwBreak(tid),
            StopReason::Step => {
                MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP }
            }
            StopReason::Watch { addr, kind } => MultiThreadStopReason::Watch {
                tid,
                kind: match kind {
                    WatchKind::Write => GdbWatchKind::Write,
                    WatchKind::Read => GdbWatchKind::Read,
                    WatchKind::Access => GdbWatchKind::ReadWrite,
                },
                addr,
            },
            StopReason::Hypercall(nr) if self.gdb_catches(nr) => {
                MultiThreadStopReason::CatchSyscall {
                    tid: Some(tid),
                    number: nr,
                    position: CatchSyscallPosition::Entry,
                }
            }
            StopReason::Hypercall(_) => {
                MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP }
            }
            StopReason::Interrupt => {
                MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGINT }
            }
            // gdb wrote the INT3 (a memory breakpoint): it recognises its own address one byte
            // back and moves RIP there, as with a Linux process.
            StopReason::Int3 => {
                MultiThreadStopReason::SignalWithThread { tid, signal: Signal::SIGTRAP }
            }
        }
    }

    /// Catch hypercall `nr` (or every one), as `--gdb-break-on-hypercall` does.
    pub(crate) fn catch_user(&mut self, nr: Option<u64>) {
        match nr {
            Some(nr) => {
                self.user_catch.insert(nr);
            }
            None => self.user_catch_all = true,
        }
        self.update_catches();
    }
}

impl Target for GdbTarget {
    type Arch = X86_64_SSE;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_catch_syscalls(&mut self) -> Option<CatchSyscallsOps<'_, Self>> {
        Some(self)
    }

    // gdb inserts breakpoints through Z packets (the backend arms them); it never writes
    // INT3 into guest code itself.
    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        true
    }
}

impl MultiThreadBase for GdbTarget {
    fn read_registers(&mut self, out: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = vcpu_of(tid);
        let (r, s) = match self.regs(vcpu).and_then(|r| Ok((r, self.sregs(vcpu)?))) {
            Ok(v) => v,
            Err(e) => return nonfatal(e),
        };
        out.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        out.rip = r.rip;
        out.eflags = r.rflags as u32;
        out.segments.cs = u32::from(s.cs.selector);
        out.segments.ss = u32::from(s.ss.selector);
        out.segments.ds = u32::from(s.ds.selector);
        out.segments.es = u32::from(s.es.selector);
        out.segments.fs = u32::from(s.fs.selector);
        out.segments.gs = u32::from(s.gs.selector);
        Ok(())
    }

    fn write_registers(&mut self, new: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let vcpu = vcpu_of(tid);
        let s = match self.sregs(vcpu) {
            Ok(s) => s,
            Err(e) => return nonfatal(e),
        };
        let seg = &new.segments;
        let same = [
            (seg.cs, s.cs.selector),
            (seg.ss, s.ss.selector),
            (seg.ds, s.ds.selector),
            (seg.es, s.es.selector),
            (seg.fs, s.fs.selector),
            (seg.gs, s.gs.selector),
        ]
        .iter()
        .all(|&(a, b)| a == u32::from(b));
        if !same {
            // A selector alone does not say what to load into the descriptor cache.
            return nonfatal("segment registers are read-only");
        }
        let g = new.regs;
        let r = Regs {
            rax: g[0],
            rbx: g[1],
            rcx: g[2],
            rdx: g[3],
            rsi: g[4],
            rdi: g[5],
            rbp: g[6],
            rsp: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: new.rip,
            rflags: u64::from(new.eflags),
        };
        match self.hub.request(vcpu, Request::SetRegs(r)) {
            Ok(_) => Ok(()),
            Err(e) => nonfatal(e),
        }
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let mem = match self.memory(vcpu_of(tid)) {
            Ok(m) => m,
            Err(e) => return nonfatal(e),
        };
        // Page by page: return what is mapped before the first hole.
        let mut done = 0;
        while done < data.len() {
            let addr = start.wrapping_add(done as u64);
            let in_page = (0x1000 - (addr & 0xfff)) as usize;
            let n = in_page.min(data.len() - done);
            if mem.read(addr, &mut data[done..done + n]).is_err() {
                break;
            }
            done += n;
        }
        if done == 0 && !data.is_empty() {
            return nonfatal(format!("{start:#x} is not mapped"));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let mem = match self.memory(vcpu_of(tid)) {
            Ok(m) => m,
            Err(e) => return nonfatal(e),
        };
        match mem.write(start, data) {
            Ok(()) => Ok(()),
            Err(e) => nonfatal(e),
        }
    }

    fn list_active_threads(&mut self, found: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for v in 0..self.hub.vcpus() {
            if self.hub.alive(v) {
                found(tid(v));
            }
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(&mut self) -> Option<ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for GdbTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        let default = if self.locked { Action::Stay } else { Action::Continue };
        let actions: Vec<Action> = self.actions.iter().map(|a| a.unwrap_or(default)).collect();
        self.hub.resume(&actions);
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.locked = false;
        Ok(())
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        // Signals mean nothing to a bare-metal guest: gdb's "signal" is dropped.
        self.set_action(tid, Action::Continue);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for GdbTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.set_action(tid, Action::Step);
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for GdbTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.locked = true;
        Ok(())
    }
}

impl ThreadExtraInfo for GdbTarget {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let text = format!("vCPU {}", vcpu_of(tid));
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl Breakpoints for GdbTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        // Where the backend traps INT3 (hardware KVM), gdb writes INT3 into guest memory
        // itself, as for a process: any number of breakpoints, and the debug registers stay
        // free for `hbreak` and watchpoints.
        if self.int3 {
            None
        } else {
            Some(self)
        }
    }
    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }
    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        let caps = (0..self.hub.vcpus()).filter_map(|v| self.hub.caps(v)).next();
        if caps.is_none_or(|c| c.watchpoints) {
            Some(self)
        } else {
            None
        }
    }
}

impl GdbTarget {
    fn add_breakpoint(&mut self, addr: u64, hw: bool) -> bool {
        let armed = self.hub.config().breakpoints.contains(&addr);
        if !armed && !self.room() {
            return false;
        }
        if hw { &mut self.hw } else { &mut self.sw }.insert(addr);
        self.hub.configure(|c| c.breakpoints.insert(addr));
        true
    }

    fn remove_breakpoint(&mut self, addr: u64, hw: bool) -> bool {
        let removed = if hw { &mut self.hw } else { &mut self.sw }.remove(&addr);
        if !self.sw.contains(&addr) && !self.hw.contains(&addr) {
            self.hub.configure(|c| c.breakpoints.remove(&addr));
        }
        removed
    }
}

impl SwBreakpoint for GdbTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_breakpoint(addr, false))
    }
    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_breakpoint(addr, false))
    }
}

impl HwBreakpoint for GdbTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.add_breakpoint(addr, true))
    }
    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(self.remove_breakpoint(addr, true))
    }
}

fn watch_kind(kind: GdbWatchKind) -> WatchKind {
    match kind {
        GdbWatchKind::Write => WatchKind::Write,
        GdbWatchKind::Read => WatchKind::Read,
        GdbWatchKind::ReadWrite => WatchKind::Access,
    }
}

impl HwWatchpoint for GdbTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        if !self.room() {
            return Ok(false);
        }
        let w = Watchpoint { addr, len, kind: watch_kind(kind) };
        self.hub.configure(|c| c.watchpoints.insert(w));
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let w = Watchpoint { addr, len, kind: watch_kind(kind) };
        Ok(self.hub.configure(|c| c.watchpoints.remove(&w)))
    }
}

impl CatchSyscalls for GdbTarget {
    fn enable_catch_syscalls(
        &mut self,
        filter: Option<SyscallNumbers<'_, u64>>,
    ) -> TargetResult<(), Self> {
        self.gdb_catch = Some(filter.map(|f| f.collect()));
        self.update_catches();
        Ok(())
    }

    fn disable_catch_syscalls(&mut self) -> TargetResult<(), Self> {
        self.gdb_catch = None;
        self.update_catches();
        Ok(())
    }
}

const MONITOR_HELP: &str = "vmcall monitor commands:
  monitor sregs [VCPU]         control, segment and descriptor-table registers
  monitor break-hypercall NR   stop before hypercall NR is answered (`all`: every one)
  monitor break-hypercall off  stop at no hypercall (gdb's `catch syscall` aside)
  monitor breakpoints          what is armed: breakpoints, watchpoints, hypercalls";

impl MonitorCmd for GdbTarget {
    fn handle_monitor_cmd(&mut self, cmd: &[u8], mut out: ConsoleOutput<'_>) -> Result<(), String> {
        let cmd = String::from_utf8_lossy(cmd);
        let words: Vec<&str> = cmd.split_whitespace().collect();
        match words.as_slice() {
            ["sregs"] | ["sregs", _] => {
                let vcpu = match words.get(1).map(|w| w.parse::<u32>()) {
                    None => 0,
                    Some(Ok(v)) => v,
                    Some(Err(_)) => {
                        outputln!(out, "usage: monitor sregs [VCPU]");
                        return Ok(());
                    }
                };
                match self.sregs(vcpu) {
                    Ok(s) => {
                        outputln!(out, "vCPU {vcpu}");
                        outputln!(out, "cr0  {:#018x}  cr2 {:#018x}", s.cr0, s.cr2);
                        outputln!(out, "cr3  {:#018x}  cr4 {:#018x}", s.cr3, s.cr4);
                        outputln!(out, "efer {:#018x}", s.efer);
                        outputln!(out, "gdt  base {:#x} limit {:#x}", s.gdt.base, s.gdt.limit);
                        outputln!(out, "idt  base {:#x} limit {:#x}", s.idt.base, s.idt.limit);
                        for (name, seg) in [
                            ("cs", s.cs),
                            ("ss", s.ss),
                            ("ds", s.ds),
                            ("es", s.es),
                            ("fs", s.fs),
                            ("gs", s.gs),
                            ("tr", s.tr),
                        ] {
                            outputln!(
                                out,
                                "{name}   {:#06x} base {:#x} limit {:#x}",
                                seg.selector,
                                seg.base,
                                seg.limit
                            );
                        }
                    }
                    Err(e) => outputln!(out, "cannot read vCPU {vcpu}'s registers: {e}"),
                }
            }
            ["break-hypercall", "off"] => {
                self.user_catch.clear();
                self.user_catch_all = false;
                self.update_catches();
                outputln!(out, "no hypercall stops the guest");
            }
            ["break-hypercall", "all"] => {
                self.catch_user(None);
                outputln!(out, "every hypercall stops the guest before it is answered");
            }
            ["break-hypercall", nr] => match crate::hypercall::handlers::parse_u64(nr) {
                Ok(nr) => {
                    self.catch_user(Some(nr));
                    outputln!(out, "hypercall {nr} stops the guest before it is answered");
                }
                Err(e) => outputln!(out, "break-hypercall: {e}"),
            },
            ["breakpoints"] => {
                let c = self.hub.config();
                outputln!(out, "breakpoints: {:x?}", c.breakpoints);
                outputln!(out, "watchpoints: {:x?}", c.watchpoints);
                if c.catch_all_hypercalls {
                    outputln!(out, "hypercalls: all");
                } else {
                    outputln!(out, "hypercalls: {:?}", c.catch_hypercalls);
                }
            }
            _ => outputln!(out, "{MONITOR_HELP}"),
        }
        Ok(())
    }
}

/// gdb's connection, buffered both ways. `gdbstub` writes a reply byte by byte and reads a
/// request byte by byte; on a bare `TcpStream` that is a syscall per byte sent and two per
/// byte received (a register dump was some 600 `sendto`s). Here a reply goes out in one write
/// when `gdbstub` flushes it (at the end of each packet), and reads take what has arrived.
struct GdbConnection {
    stream: TcpStream,
    out: Vec<u8>,
    input: Box<[u8; 4096]>,
    /// The bytes of `input` received and not yet taken.
    pending: std::ops::Range<usize>,
    nonblocking: bool,
}

impl GdbConnection {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            out: Vec::new(),
            input: Box::new([0; 4096]),
            pending: 0..0,
            nonblocking: false,
        }
    }

    fn set_nonblocking(&mut self, on: bool) -> std::io::Result<()> {
        if self.nonblocking != on {
            self.stream.set_nonblocking(on)?;
            self.nonblocking = on;
        }
        Ok(())
    }

    /// Receive what has arrived: at least a byte when `block`, else what there is (none:
    /// `WouldBlock`). What is queued goes out first: `gdbstub` acknowledges a packet (`+`)
    /// without flushing, and gdb waits for that before anything else.
    fn fill(&mut self, block: bool) -> std::io::Result<()> {
        use std::io::Read;
        self.send()?;
        self.set_nonblocking(!block)?;
        let n = loop {
            match Read::read(&mut self.stream, &mut self.input[..]) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.pending = 0..n;
        Ok(())
    }

    /// Send what is queued, blocking until it is sent.
    fn send(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        if self.out.is_empty() {
            return Ok(());
        }
        self.set_nonblocking(false)?;
        // Whatever the outcome, what was queued is gone: a failed write ends the session.
        let sent = Write::write_all(&mut self.stream, &self.out);
        self.out.clear();
        sent
    }
}

impl Drop for GdbConnection {
    fn drop(&mut self) {
        // The last reply or acknowledgement (of a kill, say) may still be queued.
        let _ = self.send();
    }
}

impl Connection for GdbConnection {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> Result<(), Self::Error> {
        self.out.push(byte);
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.out.extend_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        self.send()
    }

    fn on_session_start(&mut self) -> Result<(), Self::Error> {
        // Replies are small and gdb waits for each: no Nagle delay.
        self.stream.set_nodelay(true)
    }
}

impl ConnectionExt for GdbConnection {
    fn read(&mut self) -> Result<u8, Self::Error> {
        if self.pending.is_empty() {
            self.fill(true)?;
        }
        let byte = self.input[self.pending.start];
        self.pending.start += 1;
        Ok(byte)
    }

    fn peek(&mut self) -> Result<Option<u8>, Self::Error> {
        if self.pending.is_empty() {
            match self.fill(false) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(self.input[self.pending.start]))
    }
}

/// The blocking loop: waits for the VM to stop while watching the connection for Ctrl-C.
enum VmEventLoop {}

impl BlockingEventLoop for VmEventLoop {
    type Target = GdbTarget;
    type Connection = GdbConnection;
    type StopReason = MultiThreadStopReason<u64>;

    #[allow(clippy::type_complexity)]
    fn wait_for_stop_reason(
        target: &mut GdbTarget,
        conn: &mut GdbConnection,
    ) -> Result<
        Event<Self::StopReason>,
        WaitForStopReasonError<String, <GdbConnection as Connection>::Error>,
    > {
        loop {
            match target.hub.wait(POLL) {
                Waited::Stopped { vcpu, reason } => {
                    return Ok(Event::TargetStopped(target.stop_reason(vcpu, reason)))
                }
                Waited::Ended(Some(status)) => {
                    let code = status.min(255) as u8;
                    return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(code)));
                }
                // A guest fault or the timeout: vmcall says which on its stderr.
                Waited::Ended(None) => {
                    let killed = MultiThreadStopReason::Terminated(Signal::SIGKILL);
                    return Ok(Event::TargetStopped(killed));
                }
                Waited::Running => {}
            }
            if conn.peek().map_err(WaitForStopReasonError::Connection)?.is_some() {
                let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                return Ok(Event::IncomingData(byte));
            }
        }
    }

    fn on_interrupt(target: &mut GdbTarget) -> Result<Option<Self::StopReason>, String> {
        // Reported by `wait_for_stop_reason` once every vCPU has parked.
        target.hub.interrupt();
        Ok(None)
    }
}

/// A gdb session to start with a VM: where gdb connects, and what to stop at from the start.
#[derive(Debug)]
pub struct GdbSession {
    /// Where gdb connects (one connection is accepted; bind it to 127.0.0.1: the stub
    /// reads and writes guest memory for whoever connects).
    pub listener: TcpListener,
    /// Hypercall numbers that stop the guest before they are answered (`--gdb-break-on-hypercall`).
    pub break_on_hypercalls: Vec<u64>,
}

/// Start serving `session` on its own thread, with the catches it asks for, confined by
/// `filter` (`ThreadKind::Gdb`'s) before it accepts the connection.
pub(crate) fn start(
    session: GdbSession,
    hub: Arc<DebugHub>,
    ram: Arc<GuestRam>,
    filter: Option<seccompiler::BpfProgram>,
    on_kill: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<SessionEnd>> {
    hub.configure(|c| c.catch_hypercalls.extend(&session.break_on_hypercalls));
    std::thread::Builder::new().name("gdb".into()).spawn(move || {
        if let Some(Err(e)) = filter.as_ref().map(crate::seccomp::install) {
            // Never serve unconfined what was meant to be confined.
            let mut why = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                why = format!("{why}: {s}");
                source = s.source();
            }
            tracing::warn!(
                "gdb: cannot confine the stub's thread: {why}; the guest runs without gdb"
            );
            hub.detach();
            return SessionEnd::Detached;
        }
        let end = serve_with(session, hub.clone(), ram);
        if end == SessionEnd::Killed {
            // Before the detach, which would let the paused vCPUs run on.
            on_kill();
        }
        hub.detach();
        end
    })
}

fn serve_with(session: GdbSession, hub: Arc<DebugHub>, ram: Arc<GuestRam>) -> SessionEnd {
    // The vCPUs wait in their gates (paused) until gdb connects and resumes them.
    let stream = match session.listener.accept() {
        Ok((stream, peer)) => {
            tracing::info!("gdb connected from {peer}");
            stream
        }
        Err(e) => {
            tracing::warn!("gdb: cannot accept a connection: {e}; the guest runs without gdb");
            hub.detach();
            return SessionEnd::Detached;
        }
    };
    // The user's catches are already in the hub's configuration; the target keeps them when
    // gdb changes its own.
    let user: BTreeSet<u64> = session.break_on_hypercalls.iter().copied().collect();
    serve_inner(stream, hub, ram, user)
}

fn serve_inner(
    stream: TcpStream,
    hub: Arc<DebugHub>,
    ram: Arc<GuestRam>,
    user_catch: BTreeSet<u64>,
) -> SessionEnd {
    let vcpus = hub.vcpus() as usize;
    let mut target = GdbTarget {
        hub: hub.clone(),
        ram,
        sw: BTreeSet::new(),
        hw: BTreeSet::new(),
        actions: vec![None; vcpus],
        locked: false,
        int3: false,
        gdb_catch: None,
        user_catch,
        user_catch_all: false,
    };
    // What the backends can do decides how breakpoints are served: know it before gdb asks.
    if hub.wait_registered(Duration::from_secs(10)) {
        let all = || (0..hub.vcpus()).filter_map(|v| hub.caps(v));
        target.int3 = all().all(|c| c.int3);
        if target.int3 {
            hub.configure(|c| c.int3 = true);
        }
    }
    let end =
        match GdbStub::new(GdbConnection::new(stream)).run_blocking::<VmEventLoop>(&mut target) {
            Ok(DisconnectReason::Kill) => SessionEnd::Killed,
            Ok(DisconnectReason::TargetExited(_) | DisconnectReason::TargetTerminated(_)) => {
                SessionEnd::VmEnded
            }
            Ok(DisconnectReason::Disconnect) => SessionEnd::Detached,
            Err(e) => {
                tracing::warn!("gdb session ended: {e}");
                SessionEnd::Detached
            }
        };
    end
}
