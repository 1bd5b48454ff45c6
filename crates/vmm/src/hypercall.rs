//! Hypercall emulation, case by case as Linux's `kvm_emulate_hypercall` (docs/hypercalls.md).
//!
//! Backends deliver a [`HypercallExit`] (registers, CPL and mode of the caller); [`emulate`]
//! computes the value for RAX. It is a pure function of the exit, the table and a [`Platform`],
//! so the whole path runs in unit tests without any hypervisor.

use std::panic::{catch_unwind, AssertUnwindSafe};

use vmcall_abi::errno::{KVM_EINVAL, KVM_ENOSYS, KVM_EOPNOTSUPP, KVM_EPERM};
use vmcall_abi::hc::*;
use vmcall_abi::{BatchEntry, KvmClockPairing, KVM_CLOCK_PAIRING_WALLCLOCK, VMCALL_BATCH_MAX};

use crate::memory::GuestRam;
use crate::regs::CpuMode;
use crate::table::{Entry, HypercallTable};

/// Which instruction made the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HypercallInsn {
    Vmcall,
    Vmmcall,
}

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
    /// Address of the hypercall instruction.
    pub rip: u64,
    pub insn: HypercallInsn,
}

/// What a handler sees: the call after KVM's truncation and CPL rules, and checked guest memory.
#[derive(Debug)]
pub struct Call<'a> {
    pub nr: u64,
    pub args: [u64; 4],
    pub vcpu_id: u32,
    pub mode: CpuMode,
    /// Guest RAM; every access is bounds-checked.
    pub mem: &'a GuestRam,
}

/// Services of the running VM that standard hypercalls need.
pub trait Platform {
    /// Number of vCPUs (APIC ids are 0..count).
    fn vcpu_count(&self) -> u32;
    /// Wake the vCPU with `apic_id` from a PV halt, or make its next HLT return at once.
    fn kick_cpu(&self, apic_id: u64);
    /// Give up the CPU in favour of `apic_id`'s vCPU.
    fn yield_to(&self, apic_id: u64);
    /// The calling vCPU's current TSC value.
    fn guest_tsc(&self) -> u64;
}

/// A [`Platform`] with no VM behind it: `vcpus` vCPUs that kicks and yields do not reach,
/// and a TSC that reads 0. For driving [`emulate`] in tests, benchmarks and fuzzing.
#[derive(Debug, Clone, Copy)]
pub struct DetachedPlatform {
    pub vcpus: u32,
}

impl Platform for DetachedPlatform {
    fn vcpu_count(&self) -> u32 {
        self.vcpus
    }
    fn kick_cpu(&self, _: u64) {}
    fn yield_to(&self, _: u64) {}
    fn guest_tsc(&self) -> u64 {
        0
    }
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

/// The result of one emulated hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Emulated {
    /// The number after truncation.
    pub nr: u64,
    /// The arguments after truncation.
    pub args: [u64; 4],
    /// The value written to RAX.
    pub rax: u64,
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
    let op_64_bit = exit.mode.is_64bit();
    let trunc = |v: u64| if op_64_bit { v } else { v & 0xffff_ffff };
    let nr = trunc(exit.nr);
    let args = exit.args.map(trunc);
    let (ret, answered_by) = if exit.cpl != 0 {
        (neg(KVM_EPERM), AnsweredBy::NotPrivileged)
    } else {
        let call = Call { nr, args, vcpu_id, mode: exit.mode, mem };
        table.with(nr, |entry| dispatch(entry, &call, platform, Nesting::Allowed(table)))
    };
    Emulated { nr, args, rax: trunc(ret), answered_by }
}

/// Whether a call may start a batch (a batch's own entries may not), and the table a batch
/// takes its snapshot of.
#[derive(Clone, Copy)]
enum Nesting<'a> {
    Allowed(&'a HypercallTable),
    InBatch,
}

/// Step 7 of docs/hypercalls.md for a call that passed the CPL check: `entry`, the table's
/// handler for its number, if there is one, else KVM's (or vmcall's) own behaviour.
fn dispatch(
    entry: Option<&Entry>,
    call: &Call<'_>,
    platform: &dyn Platform,
    nesting: Nesting<'_>,
) -> (u64, AnsweredBy) {
    let nr = call.nr;
    match entry {
        Some(e) => {
            if nr == KVM_HC_MAP_GPA_RANGE && !e.overrides_standard {
                if let Err(err) = check_map_gpa_range(call.args) {
                    return (err, AnsweredBy::Custom);
                }
            }
            match catch_unwind(AssertUnwindSafe(|| e.handler.call(call))) {
                Ok(Ok(v)) => (v, AnsweredBy::Custom),
                Ok(Err(err)) => (err.to_rax(), AnsweredBy::Custom),
                Err(_) => {
                    tracing::error!(nr, handler = %e.name, "hypercall handler panicked; the guest gets -KVM_EFAULT");
                    (neg(vmcall_abi::errno::KVM_EFAULT), AnsweredBy::Panicked)
                }
            }
        }
        None if nr == VMCALL_HC_BATCH => match nesting {
            Nesting::Allowed(table) => (batch(table, call, platform), AnsweredBy::Standard),
            Nesting::InBatch => (neg(KVM_EINVAL), AnsweredBy::Standard),
        },
        None => (standard(call, platform, call.mode.is_64bit()), AnsweredBy::Standard),
    }
}

/// `VMCALL_HC_BATCH`: answer each entry of the array at a0 (a1 entries) as a single call
/// from the same caller would be answered, writing each result to its `ret`. Each entry is
/// copied out of guest memory once (64 at a time) before it is answered, and all are looked up
/// in one snapshot of the table: another vCPU rewriting the array mid-batch can change what a
/// later entry says, never how one entry is handled. Returns the number of entries processed: the end of guest RAM cuts a batch short
/// (-KVM_EFAULT if not even the first entry is inside it), more than `VMCALL_BATCH_MAX` entries
/// is -KVM_E2BIG, and a nested batch entry gets -KVM_EINVAL.
fn batch(table: &HypercallTable, call: &Call<'_>, platform: &dyn Platform) -> u64 {
    const ENTRY: u64 = core::mem::size_of::<BatchEntry>() as u64;
    let [base, count, ..] = call.args;
    if count > VMCALL_BATCH_MAX {
        return neg(vmcall_abi::errno::KVM_E2BIG);
    }
    if count == 0 {
        return 0;
    }
    let in_ram = call.mem.size().checked_sub(base).map_or(0, |room| room / ENTRY);
    let count = count.min(in_ram);
    if count == 0 {
        return neg(vmcall_abi::errno::KVM_EFAULT);
    }
    let Ok(view) = call.mem.view(base, count * ENTRY) else {
        return neg(vmcall_abi::errno::KVM_EFAULT);
    };
    let trunc = |v: u64| if call.mode.is_64bit() { v } else { v & 0xffff_ffff };
    let snapshot = table.snapshot();
    // Entries are copied out a chunk at a time, each before any of it is answered.
    const CHUNK: usize = 64;
    let mut raw = [0u8; CHUNK * ENTRY as usize];
    for first in (0..count as usize).step_by(CHUNK) {
        let n = CHUNK.min(count as usize - first);
        let chunk = &mut raw[..n * ENTRY as usize];
        if view.read(first * ENTRY as usize, chunk).is_err() {
            return first as u64;
        }
        for (k, bytes) in chunk.chunks_exact(ENTRY as usize).enumerate() {
            let word =
                |w: usize| u64::from_le_bytes(bytes[8 * w..8 * w + 8].try_into().expect("8 bytes"));
            let entry = Call {
                nr: trunc(word(0)),
                args: [word(1), word(2), word(3), word(4)].map(trunc),
                vcpu_id: call.vcpu_id,
                mode: call.mode,
                mem: call.mem,
            };
            let (ret, _) = dispatch(snapshot.get(entry.nr), &entry, platform, Nesting::InBatch);
            // Inside the view: this entry was just read from it.
            let _ = view.write_u64((first + k) * ENTRY as usize + 40, trunc(ret));
        }
    }
    count
}

fn neg(code: i64) -> u64 {
    code.wrapping_neg() as u64
}

/// KVM's behaviour for numbers without a custom handler.
fn standard(call: &Call<'_>, platform: &dyn Platform, op_64_bit: bool) -> u64 {
    let [a0, a1, a2, a3] = call.args;
    match call.nr {
        KVM_HC_VAPIC_POLL_IRQ => 0,
        KVM_HC_KICK_CPU => {
            platform.kick_cpu(a1);
            platform.yield_to(a1);
            0
        }
        KVM_HC_CLOCK_PAIRING => clock_pairing(call.mem, a0, a1, platform),
        KVM_HC_SEND_IPI => send_ipi(platform, a0, a1, a2, a3, op_64_bit),
        KVM_HC_SCHED_YIELD => {
            platform.yield_to(a0);
            0
        }
        // MAP_GPA_RANGE only reaches here with no user-space handler: KVM answers -ENOSYS.
        _ => neg(KVM_ENOSYS),
    }
}

/// `KVM_HC_MAP_GPA_RANGE`'s checks: page-aligned GPA, non-zero page count, no overflow.
fn check_map_gpa_range([gpa, npages, _attrs, _]: [u64; 4]) -> Result<(), u64> {
    let gfn = gpa >> 12;
    if gpa & 0xfff != 0 || npages == 0 || gfn.checked_add(npages).is_none_or(|end| end <= gfn) {
        return Err(neg(KVM_EINVAL));
    }
    Ok(())
}

/// `KVM_HC_CLOCK_PAIRING`: host wall-clock time and the matching guest TSC at `gpa`.
fn clock_pairing(mem: &GuestRam, gpa: u64, clock_type: u64, platform: &dyn Platform) -> u64 {
    if clock_type != KVM_CLOCK_PAIRING_WALLCLOCK {
        return neg(KVM_EOPNOTSUPP);
    }
    let tsc = platform.guest_tsc();
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let cp = KvmClockPairing {
        sec: now.as_secs() as i64,
        nsec: i64::from(now.subsec_nanos()),
        tsc,
        ..Default::default()
    };
    let mut bytes = [0u8; 64];
    bytes[0..8].copy_from_slice(&cp.sec.to_le_bytes());
    bytes[8..16].copy_from_slice(&cp.nsec.to_le_bytes());
    bytes[16..24].copy_from_slice(&cp.tsc.to_le_bytes());
    match mem.write(gpa, &bytes) {
        Ok(()) => 0,
        Err(_) => neg(vmcall_abi::errno::KVM_EFAULT),
    }
}

/// `KVM_HC_SEND_IPI` (`kvm_pv_send_ipi`): validates the ICR and counts the existing
/// destination vCPUs. vmcall has no interrupt controller yet, so the IPI itself is not
/// delivered (see docs/hypercalls.md).
fn send_ipi(
    platform: &dyn Platform,
    low: u64,
    high: u64,
    min: u64,
    icr: u64,
    op_64_bit: bool,
) -> u64 {
    const APIC_DEST_MASK: u64 = 0x800;
    const APIC_SHORT_MASK: u64 = 0xc0000;
    if icr & (APIC_DEST_MASK | APIC_SHORT_MASK) != 0 {
        return neg(KVM_EINVAL);
    }
    let width = if op_64_bit { 64 } else { 32 };
    let min = u64::from(min as u32); // `u32 min` in the kernel
    let count = platform.vcpu_count() as u64;
    let mut delivered = 0u64;
    for (half, bits) in [(0u64, low), (width, high)] {
        for bit in 0..width {
            if bits >> bit & 1 == 1 {
                if let Some(apic) = min.checked_add(half + bit) {
                    delivered += u64::from(apic < count);
                }
            }
        }
    }
    delivered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::HypercallError;
    use std::cell::RefCell;

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
        HypercallExit { nr, args, cpl, mode, rip: 0x20_0000, insn: HypercallInsn::Vmcall }
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
    }

    #[test]
    fn handler_errors_and_panics() {
        let t = HypercallTable::new();
        t.register(20, "bad", |c: &Call<'_>| Ok(c.mem.read_u64(u64::MAX - 2)?)).unwrap();
        t.register(21, "inval", |_: &Call<'_>| Err(HypercallError::Errno(KVM_EINVAL))).unwrap();
        t.register(22, "boom", |_: &Call<'_>| -> crate::table::HypercallResult { panic!("boom") })
            .unwrap();
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
    fn send_ipi_counts_existing_vcpus() {
        let t = HypercallTable::new();
        assert_eq!(run(&t, call(10, [0b111, 0, 0, 0xfd], 0, M64)).rax, 2);
        assert_eq!(run(&t, call(10, [0b1, 0, 1, 0], 0, M64)).rax, 1);
        assert_eq!(run(&t, call(10, [1, 0, 0, 0x800], 0, M64)).rax, neg(KVM_EINVAL));
    }
}
