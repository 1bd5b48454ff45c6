//! The vCPU's four hardware breakpoints (DR0–DR3), shared by two users:
//! - the `hwbp` strategy's static sites (breakpoints on hypercall instructions), and
//! - the **guest-IDT watch**: once the guest loads its own IDT, a hypercall instruction that
//!   the CPU refuses raises #UD (or #GP at CPL > 0 under some KVMs) into the *guest's*
//!   handler, not the VMM's stub. A breakpoint on the entry of those handlers stops the vCPU
//!   before the handler's first instruction, so the host can answer a hypercall there and
//!   return to the caller as `iret` would, and let every real #UD/#GP reach the guest.
//!
//! - a debugger's breakpoints and watchpoints (`vmcall run --gdb`, docs/gdb.md).
//!
//! The watch has priority (it is what keeps hypercalls exact), the debugger comes next (what
//! a user asked for explicitly), and sites take the slots left: a site without a slot is
//! still answered, through the #UD path every strategy falls back to.
//! Breakpoints take *linear* addresses: what the guest executes at.

use kvm_bindings::kvm_guest_debug;
use kvm_ioctls::VcpuFd;
use vmcall_vmm::backend::{BackendError, WatchKind};
use vmcall_vmm::x86::descriptors::{idt_gate, GP_VECTOR, UD_VECTOR};
use vmcall_vmm::x86::{DescriptorTable, VirtualMemory};

/// Number of debug-register breakpoints.
pub const HW_BREAKPOINTS: usize = 4;

/// The vectors whose guest handlers are watched.
pub(crate) const WATCHED_VECTORS: [u8; 2] = [UD_VECTOR, GP_VECTOR];

/// What one breakpoint slot is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// A hypercall site of the `hwbp` strategy.
    Site(u64),
    /// The entry of the guest's handler for this vector.
    Handler { addr: u64, vector: u8 },
    /// A debugger's breakpoint.
    Break(u64),
    /// A debugger's watchpoint: `len` is 1, 2, 4 or 8 and `addr` a multiple of it (what the
    /// debug registers can watch). Reads alone cannot be watched: `Read` arms read/write.
    Watch { addr: u64, len: u8, kind: WatchKind },
}

impl Slot {
    fn addr(self) -> u64 {
        match self {
            Slot::Site(a) | Slot::Handler { addr: a, .. } | Slot::Break(a) => a,
            Slot::Watch { addr, .. } => addr,
        }
    }

    /// DR7's R/W and LEN bits for this slot (before shifting into place).
    fn rw_len(self) -> u64 {
        match self {
            Slot::Watch { len, kind, .. } => {
                let rw = if kind == WatchKind::Write { 0b01 } else { 0b11 };
                let len = match len {
                    1 => 0b00,
                    2 => 0b01,
                    8 => 0b10,
                    _ => 0b11,
                };
                rw | (len << 2)
            }
            _ => 0, // execute, LEN 00
        }
    }
}

/// The breakpoints of one vCPU: what is armed now, and what it was computed from.
#[derive(Debug, Default)]
pub(crate) struct DebugRegs {
    sites: Vec<u64>,
    /// The debugger's breakpoints and watchpoints, and whether it single-steps.
    user: Vec<Slot>,
    single_step: bool,
    /// The debugger's INT3s trap (KVM_GUESTDBG_USE_SW_BP).
    int3: bool,
    armed: Vec<Slot>,
    /// Whether KVM's state is exactly `armed` (it is at the start: nothing armed).
    applied: bool,
    /// Single-stepping over a breakpoint (see [`DebugRegs::step_over`]).
    stepping: bool,
}

impl DebugRegs {
    pub(crate) fn new(sites: Vec<u64>) -> Self {
        Self {
            sites,
            user: Vec::new(),
            single_step: false,
            int3: false,
            armed: Vec::new(),
            applied: true,
            stepping: false,
        }
    }

    /// What a debugger wants armed (applied at the next [`DebugRegs::arm`]).
    pub(crate) fn set_user(&mut self, slots: Vec<Slot>, single_step: bool, int3: bool) {
        if slots != self.user || single_step != self.single_step || int3 != self.int3 {
            self.user = slots;
            self.single_step = single_step;
            self.int3 = int3;
            self.applied = false;
        }
    }

    /// Whether INT3s trap to the host.
    pub(crate) fn int3(&self) -> bool {
        self.int3
    }

    /// Whether the debugger single-steps.
    pub(crate) fn single_step(&self) -> bool {
        self.single_step
    }

    /// Whether the debugger has a breakpoint at linear `addr` (armed or not).
    pub(crate) fn user_breakpoint(&self, addr: u64) -> bool {
        self.user.contains(&Slot::Break(addr))
    }

    /// The armed slot whose debug register DR6 names, if any.
    pub(crate) fn hit_by_dr6(&self, dr6: u64) -> Option<Slot> {
        let i = (0..HW_BREAKPOINTS).find(|i| dr6 & (1 << i) != 0)?;
        self.armed.get(i).copied()
    }

    /// Whether a single step over a breakpoint is in progress.
    pub(crate) fn stepping(&self) -> bool {
        self.stepping
    }

    /// Let the instruction at breakpoint `addr` run once: KVMs need not honour RFLAGS.RF for
    /// a host breakpoint (kvm_pvm does not), so the slot comes off for one single step, and
    /// [`DebugRegs::finish_step`] puts it back at the step's debug exit.
    pub(crate) fn step_over(&mut self, fd: &VcpuFd, addr: u64) -> Result<(), BackendError> {
        let rest: Vec<Slot> = self
            .armed
            .iter()
            .copied()
            .filter(|s| s.addr() != addr || matches!(s, Slot::Watch { .. }))
            .collect();
        let mut dbg = guest_debug(&rest, false, self.int3);
        dbg.control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
        fd.set_guest_debug(&dbg).map_err(crate::ioctl("KVM_SET_GUEST_DEBUG"))?;
        self.armed = rest;
        self.stepping = true;
        Ok(())
    }

    /// The single step of [`DebugRegs::step_over`] is done: the next [`DebugRegs::arm`] puts
    /// every breakpoint back (and single-stepping off).
    pub(crate) fn finish_step(&mut self) {
        self.stepping = false;
        self.applied = false;
        self.armed.clear();
    }

    /// The slot whose address is `pc`, if a breakpoint there is armed.
    pub(crate) fn hit(&self, pc: u64) -> Option<Slot> {
        self.armed.iter().copied().find(|s| s.addr() == pc)
    }

    /// Arm `handlers` (the guest's watched handlers; empty while the VMM's IDT is in use)
    /// and as many sites as slots remain, issuing KVM_SET_GUEST_DEBUG only on a change.
    pub(crate) fn arm(&mut self, fd: &VcpuFd, handlers: &[Slot]) -> Result<(), BackendError> {
        if self.stepping {
            return Ok(());
        }
        let mut want: Vec<Slot> = handlers.to_vec();
        want.dedup_by_key(|s| s.addr());
        let room = HW_BREAKPOINTS.saturating_sub(want.len());
        if self.user.len() > room {
            tracing::warn!(
                asked = self.user.len(),
                free = room,
                "not every debugger breakpoint/watchpoint fits the debug registers left by the guest-IDT watch; the first ones are armed"
            );
        }
        want.extend(self.user.iter().take(room));
        let room = HW_BREAKPOINTS.saturating_sub(want.len());
        let taken: Vec<u64> = want.iter().map(|s| s.addr()).collect();
        want.extend(
            self.sites.iter().filter(|a| !taken.contains(a)).take(room).map(|a| Slot::Site(*a)),
        );
        if self.applied && want == self.armed {
            return Ok(());
        }
        fd.set_guest_debug(&guest_debug(&want, self.single_step, self.int3))
            .map_err(crate::ioctl("KVM_SET_GUEST_DEBUG"))?;
        self.armed = want;
        self.applied = true;
        Ok(())
    }
}

/// The KVM_SET_GUEST_DEBUG argument for `slots` (locally enabled: execute breakpoints, or
/// data breakpoints for watchpoints), single-stepping if `single_step`, trapping INT3 if
/// `int3` (stock KVM only: kvm_pvm fails KVM_RUN with an internal error at an INT3 then).
fn guest_debug(slots: &[Slot], single_step: bool, int3: bool) -> kvm_guest_debug {
    let mut dbg = kvm_guest_debug::default();
    if single_step {
        dbg.control = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
    }
    if int3 {
        dbg.control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP;
    }
    if slots.is_empty() {
        return dbg;
    }
    dbg.control |= kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_HW_BP;
    let mut dr7 = 0u64;
    for (i, slot) in slots.iter().take(HW_BREAKPOINTS).enumerate() {
        dbg.arch.debugreg[i] = slot.addr();
        dr7 |= 1 << (2 * i); // local enable
        dr7 |= slot.rw_len() << (16 + 4 * i);
    }
    dbg.arch.debugreg[7] = dr7;
    dbg
}

/// The linear addresses of the guest's #UD and #GP handlers under `idt` (a 64-bit IDT if
/// `long`), as slots to watch. Gates that are absent or unreadable are left out: a hypercall
/// raising that vector then cannot be delivered by the CPU either.
pub(crate) fn guest_handlers(
    mem: &VirtualMemory<'_>,
    idt: DescriptorTable,
    long: bool,
    segment_base: impl Fn(u16) -> u64,
) -> Vec<Slot> {
    WATCHED_VECTORS
        .iter()
        .filter_map(|&vector| {
            let (offset, selector) = idt_gate(mem, idt, vector, long)?;
            // Outside long mode the handler's linear address adds its code segment's base.
            let addr = if long { offset } else { (segment_base(selector) + offset) & 0xffff_ffff };
            Some(Slot::Handler { addr, vector })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmcall_vmm::memory::GuestRam;
    use vmcall_vmm::x86::PagingContext;

    #[test]
    fn breakpoints_are_execute_only_and_locally_enabled() {
        let d = guest_debug(
            &[Slot::Site(0x1000), Slot::Handler { addr: 0x2000, vector: 6 }],
            false,
            false,
        );
        assert_eq!(d.arch.debugreg[..4], [0x1000, 0x2000, 0, 0]);
        assert_eq!(d.arch.debugreg[7], 0b101);
        assert_ne!(d.control & kvm_bindings::KVM_GUESTDBG_USE_HW_BP, 0);
        assert_eq!(guest_debug(&[], false, false).control, 0, "no slots: debugging off");
        let int3 = guest_debug(&[], false, true).control;
        assert_eq!(int3, kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_USE_SW_BP);
    }

    #[test]
    fn watchpoints_set_rw_and_len_and_steps_set_singlestep() {
        let w = |addr, len, kind| Slot::Watch { addr, len, kind };
        let d = guest_debug(
            &[Slot::Break(0x1000), w(0x2000, 8, WatchKind::Write), w(0x3000, 4, WatchKind::Read)],
            true,
            false,
        );
        assert_eq!(d.arch.debugreg[..4], [0x1000, 0x2000, 0x3000, 0]);
        // DR1: write (01), 8 bytes (10); DR2: read/write (11), 4 bytes (11).
        let dr7 = 0b10101 | (0b1001 << 20) | (0b1111 << 24);
        assert_eq!(d.arch.debugreg[7], dr7);
        assert_ne!(d.control & kvm_bindings::KVM_GUESTDBG_SINGLESTEP, 0);
        let step = guest_debug(&[], true, false);
        assert_eq!(
            step.control,
            kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP
        );
    }

    #[test]
    fn watched_handlers_come_from_the_guests_idt() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let mem = VirtualMemory::new(&ram, PagingContext { cr0: 1, ..Default::default() });
        let idt = DescriptorTable { base: 0x8000, limit: 16 * 32 - 1 };
        let gate = |handler: u64| {
            (handler & 0xffff) | (8 << 16) | (0x8e << 40) | ((handler & 0xffff_0000) << 32)
        };
        ram.write_u64(0x8000 + 16 * 6, gate(0x20_1000)).unwrap();
        ram.write_u64(0x8000 + 16 * 13, gate(0x20_2000)).unwrap();
        let slots = guest_handlers(&mem, idt, true, |_| 0);
        assert_eq!(
            slots,
            vec![
                Slot::Handler { addr: 0x20_1000, vector: 6 },
                Slot::Handler { addr: 0x20_2000, vector: 13 }
            ]
        );
        // A 32-bit IDT: 8-byte gates, plus the code segment's base.
        let idt32 = DescriptorTable { base: 0x9000, limit: 8 * 32 - 1 };
        ram.write_u64(0x9000 + 8 * 6, gate(0x1000)).unwrap();
        let slots = guest_handlers(&mem, idt32, false, |sel| if sel == 8 { 0x10_0000 } else { 0 });
        assert_eq!(slots, vec![Slot::Handler { addr: 0x10_1000, vector: 6 }]);
    }
}
