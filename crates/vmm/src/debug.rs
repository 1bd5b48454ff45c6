//! A debugger's hold on a running VM, independent of any wire protocol (the gdb remote stub in
//! `gdb` (feature `gdb`) is one user): pausing every vCPU, reading and writing a paused vCPU's
//! registers, arming breakpoints, watchpoints and single steps, stopping before chosen
//! hypercalls are answered, and letting the guest run on when the debugger leaves.
//!
//! Every vCPU thread passes through the hub's gate before each `run`. While the VM is
//! paused it parks there and serves the debugger's requests itself: a backend's vCPU state
//! lives on its own thread (an emulator engine is not `Send`), so the debugger never touches
//! a vCPU directly. A vCPU that stops (breakpoint, step, watchpoint, caught hypercall) reports
//! it, which pauses the VM: every other vCPU is interrupted and parks too (all-stop, as gdb
//! expects). The dispatch of exits stays in the vCPU loop, once, above the backends.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::backend::{
    BackendError, DebugCaps, DebugStop, GuestDebug, Interrupter, Vcpu, WatchKind, Watchpoint,
};
use crate::x86::{Regs, SpecialRegs};

/// What a paused vCPU does when the VM resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Action {
    /// Run until the next stop.
    #[default]
    Continue,
    /// Run one instruction.
    Step,
    /// Stay parked while the others run (gdb's scheduler locking).
    Stay,
}

/// Why the VM stopped for the debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// At a breakpoint at this linear address.
    Breakpoint(u64),
    /// A single step ended.
    Step,
    /// A watchpoint fired.
    Watch {
        /// The start of the watched range.
        addr: u64,
        /// What the watchpoint watches.
        kind: WatchKind,
    },
    /// Just before hypercall `nr` is answered (RIP at the instruction, RAX = `nr`).
    Hypercall(u64),
    /// The debugger asked the VM to stop (gdb's Ctrl-C).
    Interrupt,
    /// An INT3 in guest code ran (RIP past it).
    Int3,
}

/// What the debugger asks a paused vCPU.
#[derive(Debug, Clone)]
pub enum Request {
    /// The general-purpose registers.
    Regs,
    /// Write the general-purpose registers.
    SetRegs(Regs),
    /// The segment, control and descriptor-table registers.
    Sregs,
}

/// A paused vCPU's answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The general-purpose registers ([`Request::Regs`]).
    Regs(Regs),
    /// The special registers ([`Request::Sregs`]).
    Sregs(SpecialRegs),
    /// A request that answers nothing was carried out.
    Done,
}

/// Where a vCPU thread is, as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    /// Not yet at its first gate.
    Starting,
    Running,
    /// Parked in the gate, serving requests.
    Parked,
    /// Halted (HLT) and waiting for a kick: its registers as of the HLT are cached.
    Halted,
    /// Its thread has ended.
    Gone,
}

#[derive(Default)]
struct Slot {
    park: Option<Park>,
    request: Option<Request>,
    reply: Option<Result<Reply, String>>,
    action: Action,
    cache: Option<(Regs, SpecialRegs)>,
    /// The configuration generation this vCPU's backend has applied, and with which action.
    applied: Option<(u64, Action)>,
    interrupter: Option<Arc<dyn Interrupter>>,
    caps: Option<DebugCaps>,
}

impl Slot {
    fn park(&self) -> Park {
        self.park.unwrap_or(Park::Starting)
    }
}

/// Breakpoints, watchpoints and hypercall catches, shared by every vCPU.
#[derive(Debug, Clone, Default)]
pub struct DebugConfig {
    /// Linear addresses to stop before.
    pub breakpoints: BTreeSet<u64>,
    /// Ranges whose accesses stop the vCPU.
    pub watchpoints: BTreeSet<Watchpoint>,
    /// Hypercall numbers to stop before answering.
    pub catch_hypercalls: BTreeSet<u64>,
    /// Stop before answering every hypercall.
    pub catch_all_hypercalls: bool,
    /// Stop at INT3s the debugger wrote into guest memory (see [`GuestDebug::int3`]).
    pub int3: bool,
}

impl DebugConfig {
    fn catches(&self, nr: u64) -> bool {
        self.catch_all_hypercalls || self.catch_hypercalls.contains(&nr)
    }

    fn guest_debug(&self, action: Action) -> GuestDebug {
        GuestDebug {
            breakpoints: self.breakpoints.iter().copied().collect(),
            watchpoints: self.watchpoints.iter().copied().collect(),
            single_step: action == Action::Step,
            int3: self.int3,
        }
    }
}

struct HubState {
    attached: bool,
    paused: bool,
    slots: Vec<Slot>,
    /// Stops not yet reported to the debugger, oldest first: the first is the one the VM is
    /// paused for; the others are reported at the next resumes without running.
    stops: VecDeque<(u32, StopReason)>,
    /// The run has ended: `Some(status)` with its exit status, `None` in an error (a guest
    /// fault, the timeout).
    ended: Option<Option<u32>>,
    config: DebugConfig,
    generation: u64,
}

/// How the debugger finds the VM when it waits for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// vCPU `vcpu` stopped for `reason`; every vCPU is parked.
    Stopped {
        /// The vCPU that stopped.
        vcpu: u32,
        /// Why it stopped.
        reason: StopReason,
    },
    /// The run ended: with its exit status, or in an error (`None`: a guest fault, the
    /// timeout).
    Ended(Option<u32>),
    /// Nothing yet.
    Running,
}

/// The meeting point of the vCPU threads and a debugger. See the module documentation.
pub struct DebugHub {
    state: Mutex<HubState>,
    /// vCPU threads wait here while parked.
    vcpu_cv: Condvar,
    /// The debugger waits here for replies and stops.
    dbg_cv: Condvar,
}

impl std::fmt::Debug for DebugHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DebugHub")
    }
}

/// How often a pausing VM interrupts vCPUs that have not parked yet (an interrupt that lands
/// just before a vCPU enters the backend can be missed).
const REINTERRUPT: Duration = Duration::from_millis(20);

impl DebugHub {
    /// A hub for `vcpus` vCPUs, attached and paused: no vCPU runs a guest instruction until
    /// the debugger resumes it.
    pub fn new(vcpus: u32) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(HubState {
                attached: true,
                paused: true,
                slots: (0..vcpus).map(|_| Slot::default()).collect(),
                stops: VecDeque::new(),
                ended: None,
                config: DebugConfig::default(),
                generation: 0,
            }),
            vcpu_cv: Condvar::new(),
            dbg_cv: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ---- the vCPU side ----

    /// A vCPU thread starts: how to interrupt it, and what its backend can do.
    pub(crate) fn register(&self, id: u32, interrupter: Arc<dyn Interrupter>, caps: DebugCaps) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.get_mut(id as usize) {
            slot.interrupter = Some(interrupter);
            slot.caps = Some(caps);
        }
        self.dbg_cv.notify_all();
    }

    /// Before each `run`: park while the VM is paused (serving requests), then bring the
    /// backend's breakpoints up to date. Returns what the vCPU was resumed with.
    pub(crate) fn gate(
        &self,
        id: u32,
        vcpu: &mut dyn Vcpu,
        stopping: impl Fn() -> bool,
    ) -> Result<Action, BackendError> {
        let i = id as usize;
        let mut st = self.lock();
        if i >= st.slots.len() {
            return Ok(Action::Continue);
        }
        loop {
            if let Some(req) = st.slots[i].request.take() {
                drop(st);
                let reply = serve(vcpu, req).map_err(|e| e.to_string());
                st = self.lock();
                st.slots[i].reply = Some(reply);
                self.dbg_cv.notify_all();
                continue;
            }
            let hold = st.attached
                && st.ended.is_none()
                && (st.paused || st.slots[i].action == Action::Stay);
            if !hold || stopping() {
                break;
            }
            if st.slots[i].park() != Park::Parked {
                st.slots[i].park = Some(Park::Parked);
                st.slots[i].cache = None;
                self.dbg_cv.notify_all();
            }
            st = self.vcpu_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.slots[i].park = Some(Park::Running);
        let action = if st.attached { st.slots[i].action } else { Action::Continue };
        let want = (st.generation, action);
        if st.slots[i].applied != Some(want) {
            let debug =
                if st.attached { st.config.guest_debug(action) } else { GuestDebug::default() };
            drop(st);
            vcpu.set_guest_debug(&debug)?;
            self.lock().slots[i].applied = Some(want);
        }
        Ok(action)
    }

    /// vCPU `id` stopped for `reason`: pause the VM (the vCPU parks at its next gate).
    pub(crate) fn report(&self, id: u32, reason: StopReason) {
        let mut st = self.lock();
        if !st.attached {
            return;
        }
        st.stops.push_back((id, reason));
        self.pause(&mut st);
    }

    fn pause(&self, st: &mut HubState) {
        st.paused = true;
        for slot in &st.slots {
            if slot.park() == Park::Running {
                if let Some(i) = &slot.interrupter {
                    i.interrupt();
                }
            }
        }
        self.dbg_cv.notify_all();
    }

    /// Whether hypercall `nr` must stop the VM before it is answered.
    pub(crate) fn catches(&self, nr: u64) -> bool {
        let st = self.lock();
        st.attached && st.config.catches(nr)
    }

    /// What vCPU `id` was last resumed with (`Continue` without a debugger).
    pub(crate) fn action(&self, id: u32) -> Action {
        let st = self.lock();
        match st.slots.get(id as usize) {
            Some(slot) if st.attached => slot.action,
            _ => Action::Continue,
        }
    }

    /// vCPU `id` halts: keep its registers for the debugger, which cannot ask it while it
    /// waits for a kick.
    pub(crate) fn halting(&self, id: u32, vcpu: &mut dyn Vcpu) {
        let cache = vcpu.regs().ok().zip(vcpu.sregs().ok());
        let mut st = self.lock();
        if let Some(slot) = st.slots.get_mut(id as usize) {
            slot.park = Some(Park::Halted);
            slot.cache = cache;
        }
        self.dbg_cv.notify_all();
    }

    /// vCPU `id`'s thread ends.
    pub(crate) fn gone(&self, id: u32) {
        let mut st = self.lock();
        if let Some(slot) = st.slots.get_mut(id as usize) {
            slot.park = Some(Park::Gone);
            slot.interrupter = None;
            if slot.request.take().is_some() {
                slot.reply = Some(Err("the vCPU has stopped".into()));
            }
        }
        self.dbg_cv.notify_all();
    }

    /// The run ended (`status`: its exit status; `None` for an error).
    pub(crate) fn ended(&self, status: Option<u32>) {
        let mut st = self.lock();
        if st.ended.is_none() {
            st.ended = Some(status);
        }
        self.vcpu_cv.notify_all();
        self.dbg_cv.notify_all();
    }

    // ---- the debugger side ----

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.lock().slots.len() as u32
    }

    /// What vCPU `id`'s backend can do (once its thread has started).
    pub fn caps(&self, id: u32) -> Option<DebugCaps> {
        self.lock().slots.get(id as usize).and_then(|s| s.caps)
    }

    /// Wait up to `timeout` until every vCPU thread has said what its backend can do;
    /// whether they all have.
    pub fn wait_registered(&self, timeout: Duration) -> bool {
        let st = self.lock();
        let (st, _) = self
            .dbg_cv
            .wait_timeout_while(st, timeout, |st| {
                st.ended.is_none()
                    && st.slots.iter().any(|s| s.caps.is_none() && s.park() != Park::Gone)
            })
            .unwrap_or_else(|p| p.into_inner());
        st.slots.iter().all(|s| s.caps.is_some())
    }

    /// Whether vCPU `id`'s thread is still there.
    pub fn alive(&self, id: u32) -> bool {
        self.lock().slots.get(id as usize).is_some_and(|s| s.park() != Park::Gone)
    }

    /// Ask paused vCPU `id`; waits until it has parked. A halted vCPU answers from what it
    /// left at its HLT.
    pub fn request(&self, id: u32, req: Request) -> Result<Reply, String> {
        let i = id as usize;
        let mut st = self.lock();
        if i >= st.slots.len() {
            return Err(format!("no vCPU {id}"));
        }
        loop {
            if st.ended.is_some() {
                return Err("the VM has stopped".into());
            }
            match st.slots[i].park() {
                Park::Gone => return Err(format!("vCPU {id} has stopped")),
                Park::Halted => {
                    let Some((regs, sregs)) = st.slots[i].cache else {
                        return Err(format!("vCPU {id} is halted"));
                    };
                    return match req {
                        Request::Regs => Ok(Reply::Regs(regs)),
                        Request::Sregs => Ok(Reply::Sregs(sregs)),
                        Request::SetRegs(_) => {
                            Err(format!("vCPU {id} is halted: its registers are read-only"))
                        }
                    };
                }
                Park::Parked if st.slots[i].request.is_none() => break,
                _ => st = self.dbg_cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            }
        }
        st.slots[i].reply = None;
        st.slots[i].request = Some(req);
        self.vcpu_cv.notify_all();
        loop {
            if let Some(reply) = st.slots[i].reply.take() {
                return reply;
            }
            if st.ended.is_some() || st.slots[i].park() == Park::Gone {
                st.slots[i].request = None;
                return Err("the VM has stopped".into());
            }
            st = self.dbg_cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Change the breakpoints, watchpoints or catches; vCPUs apply it when they next run.
    pub fn configure<R>(&self, f: impl FnOnce(&mut DebugConfig) -> R) -> R {
        let mut st = self.lock();
        let r = f(&mut st.config);
        st.generation += 1;
        r
    }

    /// The current configuration.
    pub fn config(&self) -> DebugConfig {
        self.lock().config.clone()
    }

    /// Resume the paused VM, each vCPU with its action (missing ones continue). If other
    /// stops are still waiting to be reported, the VM stays paused and the next is reported.
    pub fn resume(&self, actions: &[Action]) {
        let mut st = self.lock();
        st.stops.pop_front();
        for (i, slot) in st.slots.iter_mut().enumerate() {
            slot.action = actions.get(i).copied().unwrap_or_default();
        }
        if st.stops.is_empty() {
            st.paused = false;
            self.vcpu_cv.notify_all();
        }
        self.dbg_cv.notify_all();
    }

    /// Stop the running VM (the stop is reported as [`StopReason::Interrupt`] on the first
    /// vCPU still there, unless another stop comes first).
    pub fn interrupt(&self) {
        let mut st = self.lock();
        if st.stops.is_empty() {
            let vcpu = st.slots.iter().position(|s| s.park() != Park::Gone).unwrap_or(0);
            st.stops.push_back((vcpu as u32, StopReason::Interrupt));
        }
        self.pause(&mut st);
    }

    /// Wait up to `timeout` for the VM to stop (every vCPU parked, halted or gone) or end.
    pub fn wait(&self, timeout: Duration) -> Waited {
        let mut st = self.lock();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = st.ended {
                return Waited::Ended(status);
            }
            if let Some(&(vcpu, reason)) = st.stops.front() {
                let settled = st
                    .slots
                    .iter()
                    .all(|s| matches!(s.park(), Park::Parked | Park::Halted | Park::Gone));
                if settled {
                    return Waited::Stopped { vcpu, reason };
                }
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                if st.paused {
                    // Interrupts can be missed just before a vCPU enters the backend.
                    self.pause(&mut st);
                }
                return Waited::Running;
            }
            let wait = (deadline - now).min(REINTERRUPT);
            st = self.dbg_cv.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The debugger leaves: every breakpoint, watchpoint and catch is dropped and the guest
    /// runs on as if no debugger had been there.
    pub fn detach(&self) {
        let mut st = self.lock();
        st.attached = false;
        st.paused = false;
        st.stops.clear();
        st.config = DebugConfig::default();
        st.generation += 1;
        for slot in &mut st.slots {
            slot.action = Action::Continue;
        }
        self.vcpu_cv.notify_all();
        self.dbg_cv.notify_all();
    }

    /// Whether a debugger is attached.
    pub fn attached(&self) -> bool {
        self.lock().attached
    }
}

/// Serve one request on the vCPU's own thread.
fn serve(vcpu: &mut dyn Vcpu, req: Request) -> Result<Reply, BackendError> {
    Ok(match req {
        Request::Regs => Reply::Regs(vcpu.regs()?),
        Request::Sregs => Reply::Sregs(vcpu.sregs()?),
        Request::SetRegs(r) => {
            vcpu.set_regs(&r)?;
            Reply::Done
        }
    })
}

/// The stop a backend's [`DebugStop`] is, for the debugger.
pub(crate) fn stop_reason(stop: DebugStop) -> StopReason {
    match stop {
        DebugStop::Breakpoint(addr) => StopReason::Breakpoint(addr),
        DebugStop::Step => StopReason::Step,
        DebugStop::Watch { addr, kind } => StopReason::Watch { addr, kind },
        DebugStop::Int3 => StopReason::Int3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{InlineExits, VcpuExit};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A vCPU that only holds registers and remembers what it was asked to debug.
    #[derive(Default)]
    struct Fake {
        regs: Regs,
        debug: Option<GuestDebug>,
    }

    impl Vcpu for Fake {
        fn run(&mut self, _: &mut dyn InlineExits) -> Result<VcpuExit, BackendError> {
            Ok(VcpuExit::Hlt)
        }
        fn complete_hypercall(&mut self, _: u64) -> Result<(), BackendError> {
            Ok(())
        }
        fn complete_io_in(&mut self, _: u32) -> Result<(), BackendError> {
            Ok(())
        }
        fn complete_mmio_read(&mut self, _: u64) -> Result<(), BackendError> {
            Ok(())
        }
        fn regs(&mut self) -> Result<Regs, BackendError> {
            Ok(self.regs)
        }
        fn set_regs(&mut self, regs: &Regs) -> Result<(), BackendError> {
            self.regs = *regs;
            Ok(())
        }
        fn sregs(&mut self) -> Result<SpecialRegs, BackendError> {
            Ok(SpecialRegs::default())
        }
        fn set_guest_debug(&mut self, debug: &GuestDebug) -> Result<(), BackendError> {
            self.debug = Some(debug.clone());
            Ok(())
        }
        fn guest_tsc(&mut self) -> u64 {
            0
        }
        fn interrupter(&self) -> Arc<dyn Interrupter> {
            Arc::new(Count::default())
        }
    }

    #[derive(Default)]
    struct Count(AtomicU32);

    impl Interrupter for Count {
        fn interrupt(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Run `gate` for vCPU `id` on its own thread, as the vCPU loop does.
    fn gate_thread(hub: &Arc<DebugHub>, id: u32) -> std::thread::JoinHandle<(Action, Fake)> {
        let hub = hub.clone();
        std::thread::spawn(move || {
            let mut vcpu = Fake::default();
            let action = hub.gate(id, &mut vcpu, || false).expect("gate");
            (action, vcpu)
        })
    }

    #[test]
    fn a_paused_vcpu_serves_requests_then_runs_with_the_new_configuration() {
        let hub = DebugHub::new(1);
        let vcpu = gate_thread(&hub, 0);
        let regs = Regs { rax: 5, rip: 0x1000, ..Regs::default() };
        assert!(matches!(hub.request(0, Request::SetRegs(regs)), Ok(Reply::Done)));
        match hub.request(0, Request::Regs) {
            Ok(Reply::Regs(r)) => assert_eq!(r, regs),
            other => panic!("{other:?}"),
        }
        hub.configure(|c| c.breakpoints.insert(0x2000));
        hub.resume(&[Action::Step]);
        let (action, fake) = vcpu.join().expect("vCPU thread");
        assert_eq!(action, Action::Step);
        let want =
            GuestDebug { breakpoints: vec![0x2000], single_step: true, ..Default::default() };
        assert_eq!(fake.debug, Some(want));
        assert_eq!(fake.regs, regs, "the write reached the vCPU");
    }

    #[test]
    fn a_stop_pauses_every_vcpu_and_a_detach_lets_them_run_without_debugging() {
        let hub = DebugHub::new(2);
        let (i0, i1) = (Arc::new(Count::default()), Arc::new(Count::default()));
        hub.register(0, i0.clone(), DebugCaps::default());
        hub.register(1, i1.clone(), DebugCaps::default());
        hub.resume(&[]);
        // vCPU 1 runs (passes its gate); vCPU 0 stops at a breakpoint.
        let mut v1 = Fake::default();
        assert_eq!(hub.gate(1, &mut v1, || false).expect("gate"), Action::Continue);
        hub.report(0, StopReason::Breakpoint(0x10));
        assert!(i1.0.load(Ordering::SeqCst) >= 1, "the running vCPU was interrupted");
        assert_eq!(i0.0.load(Ordering::SeqCst), 0, "the stopping one was not");
        // Not reported until every vCPU has parked.
        assert_eq!(hub.wait(Duration::from_millis(30)), Waited::Running);
        let (t0, t1) = (gate_thread(&hub, 0), gate_thread(&hub, 1));
        let stop = Waited::Stopped { vcpu: 0, reason: StopReason::Breakpoint(0x10) };
        assert_eq!(hub.wait(Duration::from_secs(30)), stop);
        hub.configure(|c| c.breakpoints.insert(0x10));
        hub.detach();
        for t in [t0, t1] {
            let (action, fake) = t.join().expect("vCPU thread");
            assert_eq!(action, Action::Continue);
            assert_eq!(fake.debug, Some(GuestDebug::default()), "nothing armed after detach");
        }
        assert!(!hub.catches(20) && hub.config().breakpoints.is_empty());
    }

    #[test]
    fn requests_fail_once_the_run_has_ended() {
        let hub = DebugHub::new(1);
        hub.ended(Some(3));
        assert!(hub.request(0, Request::Regs).is_err());
        assert_eq!(hub.wait(Duration::ZERO), Waited::Ended(Some(3)));
    }
}
