//! Hypercall emulation, case by case as Linux's `kvm_emulate_hypercall` (docs/hypercalls.md).
//!
//! Backends deliver a [`HypercallExit`] (registers, CPL and mode of the caller); [`emulate`]
//! computes the value for RAX. It is a pure function of the exit, the table and a [`Platform`],
//! so the whole path runs in unit tests without any hypervisor.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;

use vmcall_abi::errno::{KVM_EINVAL, KVM_EPERM};
use vmcall_abi::hc::{KVM_HC_MAP_GPA_RANGE, VMCALL_HC_BATCH, VMCALL_HC_LIST};

use super::batch::batch;
use super::call::{neg, Call};
pub use super::insn::HypercallInsn;
use super::list::list;
use super::platform::Platform;
use super::standard::{check_map_gpa_range, standard};
use super::table::{Entry, HypercallTable, SnapshotRef};
use crate::memory::GuestRam;
use crate::x86::{CpuMode, PagingContext};

/// A trapped hypercall, as a backend saw it (before any truncation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HypercallExit {
    /// RAX.
    pub nr: u64,
    /// RBX, RCX, RDX, RSI.
    pub args: [u64; 4],
    /// Privilege level of the caller.
    pub cpl: u8,
    /// Mode of the caller.
    pub mode: CpuMode,
    /// Address of the hypercall instruction (guest-virtual, as the caller executed it).
    pub rip: u64,
    /// The instruction that made the call.
    pub insn: HypercallInsn,
    /// The caller's paging registers, for handlers that follow virtual pointers.
    pub paging: PagingContext,
}

/// Who answered a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnsweredBy {
    /// KVM's own behaviour for this number (including -KVM_ENOSYS for unknown ones).
    Standard,
    /// A handler from the table.
    Custom,
    /// Refused before dispatch (-KVM_EPERM).
    NotPrivileged,
    /// The handler panicked; the guest got -KVM_EFAULT.
    Panicked,
}

impl AnsweredBy {
    /// Every value, for parsing.
    pub const ALL: [AnsweredBy; 4] =
        [AnsweredBy::Standard, AnsweredBy::Custom, AnsweredBy::NotPrivileged, AnsweredBy::Panicked];

    /// The stable name traces and recordings use: `standard`, `custom`, `not-privileged`,
    /// `panicked`.
    pub fn name(self) -> &'static str {
        match self {
            AnsweredBy::Standard => "standard",
            AnsweredBy::Custom => "custom",
            AnsweredBy::NotPrivileged => "not-privileged",
            AnsweredBy::Panicked => "panicked",
        }
    }

    /// The value [`AnsweredBy::name`] calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// The result of one emulated hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emulated {
    /// The number after truncation.
    pub nr: u64,
    /// The arguments after truncation.
    pub args: [u64; 4],
    /// The value written to RAX.
    pub rax: u64,
    /// Who answered it.
    pub answered_by: AnsweredBy,
}

/// Emulate one hypercall: steps 4–8 of docs/hypercalls.md (the backend does step 2, the RIP
/// advance, when it completes the call).
pub fn emulate(
    table: &HypercallTable,
    exit: &HypercallExit,
    vcpu_id: u32,
    mem: &GuestRam,
    platform: &dyn Platform,
) -> Emulated {
    emulate_with(table, exit, vcpu_id, mem, platform, |done, _| *done)
}

/// [`emulate`], then `done` with the result and the table entry that answered it (`None` when
/// no custom handler did), while that entry is still the one the call loaded: what it reports
/// (the handler's name, say) is the handler's at the time of the call, whatever the table
/// says by then.
pub fn emulate_with<R>(
    table: &HypercallTable,
    exit: &HypercallExit,
    vcpu_id: u32,
    mem: &GuestRam,
    platform: &dyn Platform,
    done: impl FnOnce(&Emulated, Option<&Entry>) -> R,
) -> R {
    let op_64_bit = exit.mode.is_64bit();
    let mask = if op_64_bit { u64::MAX } else { 0xffff_ffff };
    let trunc = |v: u64| v & mask;
    let nr = trunc(exit.nr);
    // Element by element: an array `map` here compiled to stores the copies into `Call` and
    // `Emulated` then read back across (a store-forwarding stall on every call).
    let a = &exit.args;
    let args = [a[0] & mask, a[1] & mask, a[2] & mask, a[3] & mask];
    if exit.cpl != 0 {
        let r = Emulated {
            nr,
            args,
            rax: trunc(neg(KVM_EPERM)),
            answered_by: AnsweredBy::NotPrivileged,
        };
        return done(&r, None);
    }
    let call = Call { nr, args, vcpu_id, mode: exit.mode, mem, paging: exit.paging };
    table.with_snapshot(|snapshot| {
        let entry = snapshot.get(nr);
        let (ret, answered_by) = dispatch(entry, &call, platform, Nesting::Allowed(snapshot));
        let r = Emulated { nr, args, rax: trunc(ret), answered_by };
        let by = match answered_by {
            AnsweredBy::Custom | AnsweredBy::Panicked => entry,
            AnsweredBy::Standard | AnsweredBy::NotPrivileged => None,
        };
        done(&r, by)
    })
}

/// Whether a call to `e` must go through [`dispatch`] one at a time: `KVM_HC_MAP_GPA_RANGE`
/// registered without an override, whose argument checks come first and refuse a call
/// uncounted. Every other custom call is counted and answered by [`answer_custom`].
#[inline]
pub(super) fn counts_alone(e: &Entry, call: &Call<'_>) -> bool {
    call.nr == KVM_HC_MAP_GPA_RANGE && !e.overrides_standard
}

/// Call `e`'s handler (the call already counted): its answer, or -KVM_EFAULT if it panicked.
#[inline]
pub(super) fn answer_custom(e: &Entry, call: &Call<'_>) -> (u64, AnsweredBy) {
    match catch_unwind(AssertUnwindSafe(|| e.handler.call(call))) {
        Ok(Ok(v)) => (v, AnsweredBy::Custom),
        Ok(Err(err)) => (err.to_rax(), AnsweredBy::Custom),
        Err(_) => {
            tracing::error!(nr = call.nr, handler = %e.name, "hypercall handler panicked; the guest gets -KVM_EFAULT");
            (neg(vmcall_abi::errno::KVM_EFAULT), AnsweredBy::Panicked)
        }
    }
}

/// Answer a run of calls to `e` (`call` with the arguments `args[i]` in turn, all counted
/// already), each answer to `rets[i]`: a call whose handler panicked gets -KVM_EFAULT and the
/// run goes on with the next, as separate calls would.
pub(super) fn answer_custom_run(
    e: &Entry,
    call: &mut Call<'_>,
    args: &[[u64; 4]],
    rets: &mut [u64],
) {
    let mut next = 0;
    while next < args.len() {
        let run =
            catch_unwind(AssertUnwindSafe(|| e.handler.call_run(call, args, rets, &mut next)));
        if run.is_ok() {
            break;
        }
        tracing::error!(nr = call.nr, handler = %e.name, "hypercall handler panicked; the guest gets -KVM_EFAULT");
        rets[next] = neg(vmcall_abi::errno::KVM_EFAULT);
        next += 1;
    }
}

/// Whether a call may start a batch (a batch's own entries may not), and the snapshot of the
/// table the call was looked up in, which a batch or a list uses too.
#[derive(Clone, Copy)]
pub(super) enum Nesting<'a> {
    Allowed(SnapshotRef<'a>),
    InBatch(SnapshotRef<'a>),
}

/// Step 7 of docs/hypercalls.md for a call that passed the CPL check: `entry`, the table's
/// handler for its number, if there is one, else KVM's (or vmcall's) own behaviour.
pub(super) fn dispatch(
    entry: Option<&Entry>,
    call: &Call<'_>,
    platform: &dyn Platform,
    nesting: Nesting<'_>,
) -> (u64, AnsweredBy) {
    let nr = call.nr;
    match entry {
        Some(e) => {
            if counts_alone(e, call) {
                if let Err(err) = check_map_gpa_range(call.args) {
                    return (err, AnsweredBy::Custom);
                }
            }
            e.calls.fetch_add(1, Ordering::Relaxed);
            answer_custom(e, call)
        }
        None if nr == VMCALL_HC_BATCH => match nesting {
            Nesting::Allowed(snapshot) => {
                let single = |entry: Option<&Entry>, call: &Call<'_>| {
                    dispatch(entry, call, platform, Nesting::InBatch(snapshot)).0
                };
                (batch(snapshot, call, &single), AnsweredBy::Standard)
            }
            Nesting::InBatch(_) => (neg(KVM_EINVAL), AnsweredBy::Standard),
        },
        None if nr == VMCALL_HC_LIST => {
            let (Nesting::Allowed(snapshot) | Nesting::InBatch(snapshot)) = nesting;
            (list(snapshot, call), AnsweredBy::Standard)
        }
        None => (standard(call, platform, call.mode.is_64bit()), AnsweredBy::Standard),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypercall::call::{HypercallError, HypercallResult};
    use std::cell::RefCell;
    use vmcall_abi::errno::KVM_EINVAL;
    use vmcall_abi::hc::VMCALL_HC_BATCH;

    #[derive(Default)]
    struct Mock {
        kicks: RefCell<Vec<u64>>,
    }
    impl Platform for Mock {
        fn vcpu_count(&self) -> u32 {
            2
        }
        fn kick_cpu(&self, apic_id: u64) {
            self.kicks.borrow_mut().push(apic_id);
        }
        fn yield_to(&self, _: u64) {}
        fn guest_tsc(&self) -> u64 {
            12345
        }
    }

    fn call(nr: u64, args: [u64; 4], cpl: u8, mode: CpuMode) -> HypercallExit {
        HypercallExit {
            nr,
            args,
            cpl,
            mode,
            rip: 0x20_0000,
            insn: HypercallInsn::Vmcall,
            paging: PagingContext::default(),
        }
    }

    fn run(table: &HypercallTable, exit: HypercallExit) -> Emulated {
        let ram = GuestRam::new(2 << 20).unwrap();
        emulate(table, &exit, 0, &ram, &Mock::default())
    }

    const M64: CpuMode = CpuMode::Long64;
    const ENOSYS64: u64 = 0xffff_ffff_ffff_fc18;

    #[test]
    fn standard_numbers() {
        let t = HypercallTable::new();
        assert_eq!(run(&t, call(1, [0; 4], 0, M64)).rax, 0);
        for nr in [0, 2, 3, 4, 6, 7, 8, 12, 13, 20, u64::MAX] {
            assert_eq!(run(&t, call(nr, [0; 4], 0, M64)).rax, ENOSYS64, "nr {nr}");
        }
        assert_eq!(run(&t, call(11, [1, 0, 0, 0], 0, M64)).rax, 0);
    }

    #[test]
    fn kick_cpu_wakes_a1() {
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = Mock::default();
        let r = emulate(&HypercallTable::new(), &call(5, [0, 1, 0, 0], 0, M64), 0, &ram, &m);
        assert_eq!(r.rax, 0);
        assert_eq!(*m.kicks.borrow(), vec![1]);
    }

    #[test]
    fn cpl_and_truncation() {
        let t = HypercallTable::new();
        t.register(20, "echo", |c: &Call<'_>| Ok(c.args[0])).unwrap();
        assert_eq!(run(&t, call(20, [7, 0, 0, 0], 3, M64)).rax, u64::MAX, "-KVM_EPERM");
        assert_eq!(run(&t, call(1, [0; 4], 3, M64)).answered_by, AnsweredBy::NotPrivileged);
        let r =
            run(&t, call(0xdead_0000_0000_0014, [0x1_0000_0002, 0, 0, 0], 0, CpuMode::Compat32));
        assert_eq!((r.nr, r.args[0], r.rax), (20, 2, 2));
        assert_eq!(run(&t, call(999, [0; 4], 0, CpuMode::Compat32)).rax, 0xffff_fc18);
        assert_eq!(run(&t, call(20, [0; 4], 3, CpuMode::Compat32)).rax, 0xffff_ffff);
    }

    #[test]
    fn map_gpa_range_checks_run_before_the_handler() {
        let t = HypercallTable::new();
        let einval = neg(KVM_EINVAL);
        t.register(12, "map", |_: &Call<'_>| Ok(0)).unwrap();
        assert_eq!(run(&t, call(12, [0x1001, 1, 0, 0], 0, M64)).rax, einval);
        assert_eq!(run(&t, call(12, [0x1000, 0, 0, 0], 0, M64)).rax, einval);
        assert_eq!(
            run(&t, call(12, [0x10_000, u64::MAX - 8, 0, 0], 0, M64)).rax,
            einval,
            "gfn + npages wraps"
        );
        assert_eq!(run(&t, call(12, [0x1000, 1, 0, 0], 0, M64)).rax, 0);
        t.override_standard(12, "map", |_: &Call<'_>| Ok(7));
        assert_eq!(run(&t, call(12, [0x1001, 0, 0, 0], 0, M64)).rax, 7, "an override sees all");
    }

    #[test]
    fn handler_errors_and_panics() {
        let t = HypercallTable::new();
        t.register(20, "bad", |c: &Call<'_>| Ok(c.mem.read_u64(u64::MAX - 2)?)).unwrap();
        t.register(21, "inval", |_: &Call<'_>| Err(HypercallError::Errno(KVM_EINVAL))).unwrap();
        t.register(22, "boom", |_: &Call<'_>| -> HypercallResult { panic!("boom") }).unwrap();
        assert_eq!(run(&t, call(20, [0; 4], 0, M64)).rax, neg(14));
        assert_eq!(run(&t, call(21, [0; 4], 0, M64)).rax, neg(22));
        let r = run(&t, call(22, [0; 4], 0, M64));
        assert_eq!((r.rax, r.answered_by), (neg(14), AnsweredBy::Panicked));
    }

    #[test]
    fn clock_pairing_writes_the_struct() {
        let t = HypercallTable::new();
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = Mock::default();
        assert_eq!(emulate(&t, &call(9, [0x8000, 0, 0, 0], 0, M64), 0, &ram, &m).rax, 0);
        assert!(ram.read_u64(0x8000).unwrap() > 1_700_000_000);
        assert_eq!(ram.read_u64(0x8010).unwrap(), 12345);
        assert_eq!(emulate(&t, &call(9, [0x8000, 1, 0, 0], 0, M64), 0, &ram, &m).rax, neg(95));
        assert_eq!(
            emulate(&t, &call(9, [u64::MAX - 8, 0, 0, 0], 0, M64), 0, &ram, &m).rax,
            neg(14)
        );
    }

    #[test]
    fn batches_answer_each_entry_like_a_single_call() {
        let t = HypercallTable::new();
        t.register(20, "double", |c: &Call<'_>| Ok(c.args[0] * 2)).unwrap();
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = Mock::default();
        let entries: [(u64, u64); 4] = [(20, 21), (1, 0), (999, 0), (VMCALL_HC_BATCH, 0)];
        for (i, (nr, a0)) in entries.iter().enumerate() {
            ram.write_u64(0x8000 + 48 * i as u64, *nr).unwrap();
            ram.write_u64(0x8008 + 48 * i as u64, *a0).unwrap();
        }
        let r = emulate(&t, &call(VMCALL_HC_BATCH, [0x8000, 4, 0, 0], 0, M64), 0, &ram, &m);
        assert_eq!(r.rax, 4);
        let rets: Vec<u64> = (0..4).map(|i| ram.read_u64(0x8000 + 48 * i + 40).unwrap()).collect();
        assert_eq!(rets, vec![42, 0, ENOSYS64, neg(KVM_EINVAL)], "nested batches are refused");
        // The end of RAM cuts a batch short; a batch that starts outside RAM is -KVM_EFAULT.
        let end = ram.size();
        assert_eq!(
            emulate(&t, &call(VMCALL_HC_BATCH, [end - 96, 3, 0, 0], 0, M64), 0, &ram, &m).rax,
            2
        );
        assert_eq!(
            emulate(&t, &call(VMCALL_HC_BATCH, [u64::MAX - 40, 3, 0, 0], 0, M64), 0, &ram, &m).rax,
            neg(14)
        );
        assert_eq!(
            emulate(&t, &call(VMCALL_HC_BATCH, [0x8000, 1 << 40, 0, 0], 0, M64), 0, &ram, &m).rax,
            neg(7)
        );
        assert_eq!(
            emulate(&t, &call(VMCALL_HC_BATCH, [0x8000, 0, 0, 0], 0, M64), 0, &ram, &m).rax,
            0
        );
        // From CPL 3 the whole batch is refused and no entry is touched.
        ram.write_u64(0x8000 + 40, 0x55).unwrap();
        assert_eq!(
            emulate(&t, &call(VMCALL_HC_BATCH, [0x8000, 1, 0, 0], 3, M64), 0, &ram, &m).rax,
            u64::MAX
        );
        assert_eq!(ram.read_u64(0x8000 + 40).unwrap(), 0x55);
        // Outside 64-bit mode entries are truncated like single calls.
        ram.write_u64(0x8000, 0xdead_0000_0000_0014).unwrap();
        ram.write_u64(0x8008, 0x1_0000_0005).unwrap();
        assert_eq!(
            emulate(
                &t,
                &call(VMCALL_HC_BATCH, [0x8000, 1, 0, 0], 0, CpuMode::Compat32),
                0,
                &ram,
                &m
            )
            .rax,
            1
        );
        assert_eq!(ram.read_u64(0x8000 + 40).unwrap(), 10);
    }

    #[test]
    fn batch_runs_are_answered_and_counted_entry_by_entry() {
        // Runs of the same number that cross the 64-entry chunks, a handler that panics or
        // fails on some entries, standard numbers and a MAP_GPA_RANGE handler (whose argument
        // checks refuse calls uncounted) in between: every entry as a single call would be.
        let t = HypercallTable::new();
        t.register(20, "odd-panics", |c: &Call<'_>| -> HypercallResult {
            match c.args[0] {
                a if a % 7 == 3 => panic!("boom"),
                a if a % 5 == 1 => Err(HypercallError::Errno(22)),
                a => Ok(a.wrapping_mul(3).wrapping_add(c.args[3])),
            }
        })
        .unwrap();
        t.register(21, "nr", |c: &Call<'_>| Ok(c.nr + c.args[1])).unwrap();
        t.register(KVM_HC_MAP_GPA_RANGE, "map", |_: &Call<'_>| Ok(0)).unwrap();
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = Mock::default();
        let n = 150u64;
        let nr_of = |i: u64| match i {
            0..=69 | 100..=139 => 20,
            70..=79 => 21,
            80..=84 => 1,
            85..=89 => KVM_HC_MAP_GPA_RANGE,
            _ => 999,
        };
        for i in 0..n {
            let at = 0x8000 + 48 * i;
            let args = [i, 2 * i, 0, u64::MAX - i];
            // MAP_GPA_RANGE: odd entries have a misaligned address (refused, not counted).
            let args = if nr_of(i) == KVM_HC_MAP_GPA_RANGE { [i % 2, 1, 0, 0] } else { args };
            ram.write_u64(at, nr_of(i)).unwrap();
            for (w, a) in args.iter().enumerate() {
                ram.write_u64(at + 8 + 8 * w as u64, *a).unwrap();
            }
            ram.write_u64(at + 40, 0x55).unwrap();
        }
        let single = |i: u64| {
            let at = 0x8000 + 48 * i;
            let args: Vec<u64> = (0..4).map(|w| ram.read_u64(at + 8 + 8 * w).unwrap()).collect();
            let exit = call(nr_of(i), [args[0], args[1], args[2], args[3]], 0, M64);
            // Answered on a copy of the table, so that the counts below are the batch's.
            let copy = HypercallTable::new();
            for nr in t.numbers() {
                let e = t.get(nr).unwrap();
                copy.register_shared(nr, &e.name, e.handler.clone()).unwrap();
            }
            emulate(&copy, &exit, 0, &ram, &m).rax
        };
        let expected: Vec<u64> = (0..n).map(single).collect();
        let r = emulate(&t, &call(VMCALL_HC_BATCH, [0x8000, n, 0, 0], 0, M64), 0, &ram, &m);
        assert_eq!(r.rax, n);
        let rets: Vec<u64> = (0..n).map(|i| ram.read_u64(0x8000 + 48 * i + 40).unwrap()).collect();
        assert_eq!(rets, expected);
        assert_eq!(rets[3], neg(14), "a panicking entry gets -KVM_EFAULT, the next go on");
        assert_eq!(rets[4], 12u64.wrapping_add(u64::MAX - 4));
        assert_eq!(rets[11], neg(22));
        assert_eq!((t.calls(20), t.calls(21)), (110, 10), "every entry counted once");
        assert_eq!(t.calls(KVM_HC_MAP_GPA_RANGE), 2, "refused MAP_GPA_RANGE calls are not");
    }

    #[test]
    fn pv_hypercalls_are_gated_on_the_guests_pv_cpuid() {
        struct Offered(u32);
        impl Platform for Offered {
            fn vcpu_count(&self) -> u32 {
                2
            }
            fn kick_cpu(&self, _: u64) {}
            fn yield_to(&self, _: u64) {}
            fn guest_tsc(&self) -> u64 {
                0
            }
            fn pv_has(&self, bit: u32) -> bool {
                self.0 & (1 << bit) != 0
            }
        }
        let t = HypercallTable::new();
        let ram = GuestRam::new(2 << 20).unwrap();
        let ask = |p: &Offered, nr, args| emulate(&t, &call(nr, args, 0, M64), 0, &ram, p).rax;
        let none = Offered(0);
        assert_eq!(ask(&none, 5, [0, 1, 0, 0]), ENOSYS64, "KICK_CPU needs PV_UNHALT");
        assert_eq!(ask(&none, 10, [1, 0, 0, 0]), ENOSYS64, "SEND_IPI needs PV_SEND_IPI");
        assert_eq!(ask(&none, 11, [0; 4]), ENOSYS64, "SCHED_YIELD needs PV_SCHED_YIELD");
        assert_eq!(ask(&none, 1, [0; 4]), 0, "VAPIC_POLL_IRQ is not gated");
        let all = Offered((1 << 7) | (1 << 11) | (1 << 13));
        assert_eq!((ask(&all, 5, [0, 1, 0, 0]), ask(&all, 10, [1, 0, 0, 0])), (0, 1));
    }

    #[test]
    fn list_reports_the_registered_numbers() {
        use vmcall_abi::hc::VMCALL_HC_LIST;
        let t = HypercallTable::new();
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = Mock::default();
        let list = |a0: u64, a1: u64| {
            emulate(&t, &call(VMCALL_HC_LIST, [a0, a1, 0, 0], 0, M64), 0, &ram, &m).rax
        };
        assert_eq!(list(0, 0), 0);
        t.register(21, "second", |_: &Call<'_>| Ok(0)).unwrap();
        t.register(20, "a-name-longer-than-twenty-four-bytes", |_: &Call<'_>| Ok(0)).unwrap();
        t.override_standard(1, "poll", |_: &Call<'_>| Ok(0));
        assert_eq!(list(0, 0), 3, "a1 = 0 asks for the count");
        ram.write_u64(0x8000, 0x55).unwrap();
        assert_eq!(list(0x8000, 95), neg(vmcall_abi::errno::KVM_E2BIG));
        assert_eq!(ram.read_u64(0x8000).unwrap(), 0x55, "nothing written when it does not fit");
        assert_eq!(list(0x8000, 96), 3);
        let entry = |i: u64| {
            let mut raw = [0u8; 32];
            ram.read(0x8000 + 32 * i, &mut raw).unwrap();
            let mut info = vmcall_abi::HypercallInfo {
                nr: u64::from_le_bytes(raw[..8].try_into().unwrap()),
                ..Default::default()
            };
            info.name.copy_from_slice(&raw[8..]);
            (info.nr, info.name().to_string(), info.name[23])
        };
        assert_eq!(entry(0), (1, "poll".into(), 0));
        assert_eq!(entry(1), (20, "a-name-longer-than-twen".into(), 0), "cut to 23 bytes");
        assert_eq!(entry(2), (21, "second".into(), 0));
        assert_eq!(list(ram.size() - 64, 96), neg(14), "an array that runs off RAM");
        assert_eq!(list(u64::MAX - 8, 96), neg(14));
        assert_eq!(
            emulate(&t, &call(VMCALL_HC_LIST, [0, 0, 0, 0], 3, M64), 0, &ram, &m).rax,
            u64::MAX,
            "CPL 3: -KVM_EPERM"
        );
    }

    #[test]
    fn custom_calls_are_counted_live_and_the_answering_entry_is_reported() {
        let t = HypercallTable::new();
        t.register(20, "v1", |_: &Call<'_>| Ok(1)).unwrap();
        let ram = GuestRam::new(2 << 20).unwrap();
        let m = Mock::default();
        let name = emulate_with(&t, &call(20, [0; 4], 0, M64), 0, &ram, &m, |r, e| {
            t.replace(20, "v2", |_: &Call<'_>| Ok(2)).unwrap();
            (r.rax, e.map(|e| e.name.to_string()))
        });
        assert_eq!(name, (1, Some("v1".into())), "the entry that answered, not the current one");
        let by = emulate_with(&t, &call(1, [0; 4], 0, M64), 0, &ram, &m, |_, e| e.is_none());
        assert!(by, "a standard answer has no entry");
        assert_eq!(run(&t, call(20, [0; 4], 0, M64)).rax, 2);
        assert_eq!(t.calls(20), 2);
        run(&t, call(20, [0; 4], 3, M64));
        assert_eq!(t.calls(20), 2, "a refused call reaches no handler");
    }

    #[test]
    fn send_ipi_counts_existing_vcpus() {
        let t = HypercallTable::new();
        assert_eq!(run(&t, call(10, [0b111, 0, 0, 0xfd], 0, M64)).rax, 2);
        assert_eq!(run(&t, call(10, [0b1, 0, 1, 0], 0, M64)).rax, 1);
        assert_eq!(run(&t, call(10, [1, 0, 0, 0x800], 0, M64)).rax, neg(KVM_EINVAL));
    }
}
